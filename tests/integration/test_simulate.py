"""``nudgeflow simulate``: deterministic, exact, valid and realistic enough to drive every example
campaign; the file and Kafka outputs carry exactly the generated events."""

from __future__ import annotations

import json
import re
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from processors.commands.backtest import run_backtest
from processors.commands.cli import main
from processors.commands.simulate import produce_stream
from processors.core.campaign import load_campaigns
from processors.core.events import ClickEvent, parse_event, parse_ts, validate
from processors.files import LineErrors, read_events
from processors.kafka.control import CONTROL_HEADER, FLUSH
from processors.settings import REPO_ROOT, Settings
from processors.simulate import START_MS, generate
from schemas.codec import Codec

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR


@pytest.fixture(scope="module")
def stream() -> list[ClickEvent]:
    """The acceptance-sized run: 20,000 events of 2,000 users."""
    return list(generate(2_000, 20_000, seed=11))


@pytest.fixture(scope="module")
def sessions(stream: list[ClickEvent]) -> dict[str, list[ClickEvent]]:
    by_session: dict[str, list[ClickEvent]] = defaultdict(list)
    for e in stream:
        assert e.session_id is not None
        by_session[e.session_id].append(e)
    return by_session


def _types(events: list[ClickEvent]) -> list[str]:
    return [e.event_type for e in events]


# -- determinism and shape -----------------------------------------------------------------------


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    a = list(generate(200, 3_000, seed=7))
    assert a == list(generate(200, 3_000, seed=7))
    b = list(generate(200, 3_000, seed=8))
    assert [(e.user_id, e.event_type, e.ts) for e in a] != [
        (e.user_id, e.event_type, e.ts) for e in b
    ]
    # A shorter run is a prefix of a longer one (stopping early does not change the past).
    assert list(generate(200, 1_000, seed=7)) == a[:1_000]


@pytest.mark.parametrize(("users", "events"), [(1, 0), (1, 1), (1, 500), (3, 7), (500, 2_000)])
def test_exact_count_unique_ids_and_formats(users: int, events: int) -> None:
    out = list(generate(users, events, seed=5))
    assert len(out) == events
    assert [e.event_id for e in out] == [f"sim-5-{n}" for n in range(1, events + 1)]
    assert {e.user_id for e in out} <= {f"u{i:06d}" for i in range(1, users + 1)}
    for e in out:
        assert e.session_id and e.session_id.startswith(e.user_id + "-s")


def test_start_time_moves_the_stream() -> None:
    later = START_MS + 30 * DAY
    base = list(generate(20, 200, seed=1))
    moved = list(generate(20, 200, seed=1, start_ms=later))
    assert base[0].ts >= START_MS and moved[0].ts >= later
    assert moved[0].ts < later + 2 * DAY


def test_every_event_validates_and_round_trips_canonical_json(stream: list[ClickEvent]) -> None:
    for e in stream:
        assert validate(e) is e
        assert isinstance(e.ts, int)
        assert all(isinstance(v, str) for v in e.properties.values())
        assert parse_event(json.loads(json.dumps(e.to_json()))) == e


def test_arrival_order_is_ts_order_per_user_and_globally(stream: list[ClickEvent]) -> None:
    assert all(a.ts <= b.ts for a, b in zip(stream, stream[1:], strict=False))
    last: dict[str, int] = {}
    for e in stream:
        assert e.ts >= last.get(e.user_id, 0)
        last[e.user_id] = e.ts
    assert len(last) > 1_900  # nearly every user shows up in a 10-events-per-user run


def test_plausible_gaps(sessions: dict[str, list[ClickEvent]]) -> None:
    by_user: dict[str, list[list[ClickEvent]]] = defaultdict(list)
    for evs in sessions.values():
        assert len({e.user_id for e in evs}) == 1
        # within a session: seconds to minutes
        for a, b in zip(evs, evs[1:], strict=False):
            assert 1_000 <= b.ts - a.ts <= 15 * MINUTE, (a, b)
        by_user[evs[0].user_id].append(evs)
    between = []
    for user_sessions in by_user.values():
        for a, b in zip(user_sessions, user_sessions[1:], strict=False):
            between.append(b[0].ts - a[-1].ts)
    assert between and min(between) >= HOUR  # hours to days between sessions
    assert max(between) > 12 * HOUR


def test_spread_over_days_for_longer_runs() -> None:
    out = list(generate(100, 20_000, seed=2))
    assert out[-1].ts - out[0].ts > 7 * DAY
    users = {e.user_id for e in out}
    assert len(users) == 100


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="users"):
        generate(0, 10)
    with pytest.raises(ValueError, match="events"):
        generate(10, -1)
    with pytest.raises(ValueError, match="per user"):
        generate(1, 10_000_000)
    with pytest.raises(ValueError, match="start"):
        generate(1, 10, start_ms=1_700_000_000)  # seconds, not milliseconds


def test_memory_stays_bounded_by_users_not_events() -> None:
    tracemalloc.start()
    try:
        count = 0
        for _ in generate(100, 60_000, seed=3):
            count += 1
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 60_000
    assert peak < 3_000_000  # a materialised list of 60k events would be ~30 MB


# -- journeys ------------------------------------------------------------------------------------


def test_browsing(stream: list[ClickEvent]) -> None:
    views = [e for e in stream if e.event_type == "page_view"]
    assert len(views) > len(stream) // 3
    assert all(e.properties["page"].startswith("/") for e in views)


def test_product_revisits_both_outcomes(stream: list[ClickEvent]) -> None:
    views: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in stream:
        if e.event_type == "product_view":
            assert e.properties["product_name"]
            views[(e.user_id, e.properties["product_id"])].append(e.ts)

    def three_within_hour(ts: list[int]) -> bool:
        return any(ts[k + 2] - ts[k] <= HOUR for k in range(len(ts) - 2))

    revisited = [k for k, ts in views.items() if three_within_hour(ts)]
    assert len(revisited) > 100
    assert sum(1 for ts in views.values() if len(ts) < 3) > 100


def test_carts_bought_and_abandoned(
    stream: list[ClickEvent], sessions: dict[str, list[ClickEvent]]
) -> None:
    end = stream[-1].ts
    bought = abandoned = 0
    for evs in sessions.values():
        adds = [e for e in evs if e.event_type == "add_to_cart"]
        if not adds:
            continue
        for a in adds:
            assert {"product_id", "product_name", "cart_value"} <= a.properties.keys()
            assert re.fullmatch(r"\d+\.\d\d", a.properties["cart_value"])
        purchases = [e for e in evs if e.event_type == "purchase"]
        if purchases:
            bought += 1
            assert MINUTE <= purchases[0].ts - adds[-1].ts <= 30 * MINUTE  # within minutes
            assert purchases[0].properties["value"] == adds[-1].properties["cart_value"]
        elif end - adds[-1].ts > 30 * MINUTE:  # not just cut off by the end of the run
            abandoned += 1
    assert bought > 100 and abandoned > 100


@pytest.mark.parametrize(
    ("start", "finish"), [("form_start", "form_submit"), ("booking_start", "booking_complete")]
)
def test_forms_and_bookings_finished_or_dropped(
    sessions: dict[str, list[ClickEvent]], start: str, finish: str
) -> None:
    finished = dropped = 0
    for evs in sessions.values():
        types = _types(evs)
        if start not in types:
            continue
        begun = evs[types.index(start)]
        if finish in types:
            done = evs[types.index(finish)]
            assert 0 < done.ts - begun.ts < 15 * MINUTE
            finished += 1
        else:
            dropped += 1
    assert finished > 50 and dropped > 30


def test_event_signups_ahead_and_some_cancelled(stream: list[ClickEvent]) -> None:
    signups = [e for e in stream if e.event_type == "event_signup"]
    assert len(signups) > 100
    for e in signups:
        assert e.properties["event_name"]
        ahead = parse_ts(e.properties["event_start"]) - e.ts
        assert DAY <= ahead <= 11 * DAY
    cancels = {
        (e.user_id, e.properties["event_name"]) for e in stream if e.event_type == "event_cancel"
    }
    assert cancels
    assert cancels <= {(e.user_id, e.properties["event_name"]) for e in signups}
    assert sum(1 for e in signups if (e.user_id, e.properties["event_name"]) not in cancels) > 100


def test_loyalty_gold_and_silver(stream: list[ClickEvent]) -> None:
    points = [e for e in stream if e.event_type == "points_earned"]
    tiers = {e.properties["tier"] for e in points}
    assert tiers == {"gold", "silver"}
    assert all(e.properties["points"].isdigit() for e in points)
    # a user's tier is a property of the user, not of the event
    per_user: dict[str, set[str]] = defaultdict(set)
    for e in points:
        per_user[e.user_id].add(e.properties["tier"])
    assert all(len(t) == 1 for t in per_user.values())


def test_engine_decides_for_every_example_campaign(stream: list[ClickEvent]) -> None:
    campaigns = load_campaigns(REPO_ROOT / "examples" / "campaigns.yaml")
    result = run_backtest(stream, campaigns)
    assert result.events == 20_000
    assert not result.rejected  # no duplicates, nothing late
    decided = {d.campaign_id for d in result.decisions}
    assert decided == {c.id for c in campaigns.campaigns}
    counts = defaultdict(int)
    for d in result.decisions:
        counts[d.campaign_id] += 1
    assert min(counts.values()) >= 50, dict(counts)


# -- command line --------------------------------------------------------------------------------


def test_cli_out_writes_canonical_json_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = tmp_path / "events.jsonl"
    code = main(["simulate", "--users", "40", "--events", "1500", "--seed", "3", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "wrote 1500 events" in captured.out
    assert "simulate" in captured.err  # the progress bar goes to stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1_500
    first = json.loads(lines[0])
    assert first["ts"].endswith("Z") and first["event_id"] == "sim-3-1"
    errors = LineErrors(str(out), echo=None)
    assert list(read_events(out, errors)) == list(generate(40, 1_500, seed=3))
    assert len(errors) == 0


def test_cli_start_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = tmp_path / "e.jsonl"
    args = ["simulate", "--users", "5", "--events", "20", "--start", "2025-01-10T00:00:00Z"]
    assert main([*args, "--out", str(out)]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["ts"].startswith("2025-01-1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--start", "yesterday"], "not ISO-8601"),
        (["--start", "2024-03-01T00:00:00"], "no time zone"),
        (["--rate", "10"], "only apply to --topic"),
        (["--flush"], "only apply to --topic"),
        (["--linger-ms", "20"], "only apply to --topic"),
    ],
)
def test_cli_bad_input_is_a_clear_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = tmp_path / "e.jsonl"
    code = main(["simulate", "--users", "5", "--events", "20", "--out", str(out), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_needs_exactly_one_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit):
        main(["simulate", "--users", "5", "--events", "20"])
    with pytest.raises(SystemExit):
        main(["simulate", "--users", "5", "--events", "20", "--out", "x", "--topic", "t"])
    with pytest.raises(SystemExit):
        main(["simulate", "--users", "0", "--events", "20", "--out", "x"])


# -- Kafka ---------------------------------------------------------------------------------------


def test_produce_to_topic_keyed_by_user_with_flush(settings: Settings) -> None:
    topic = settings.topic_clickstream
    expected = list(generate(60, 800, seed=9))
    sent = produce_stream(settings, iter(expected), topic, len(expected), flush=True)
    assert sent == 800

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer(settings.consumer_conf("simulate-test"))  # assign(): no group join
    parts = [TopicPartition(topic, p, 0) for p in range(settings.partitions)]
    consumer.assign(parts)
    got: list[ClickEvent] = []
    per_partition: dict[int, list[ClickEvent]] = defaultdict(list)
    flushed: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(flushed) < settings.partitions and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            headers = dict(msg.headers() or [])
            if headers.get(CONTROL_HEADER) == FLUSH:
                flushed.add(msg.partition())
                continue
            event = ClickEvent.from_record(codec.decode_as("ClickEvent", msg.value()))
            assert msg.key() == event.user_id.encode()
            got.append(event)
            per_partition[msg.partition()].append(event)
    finally:
        consumer.close()
    assert flushed == set(range(settings.partitions))
    assert sorted(got, key=lambda e: int(e.event_id.rsplit("-", 1)[1])) == expected
    # each user's events keep their order within the user's partition
    for events in per_partition.values():
        last: dict[str, int] = {}
        for e in events:
            assert e.ts >= last.get(e.user_id, 0)
            last[e.user_id] = e.ts
