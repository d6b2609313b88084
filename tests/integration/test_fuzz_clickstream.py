"""Hostile clickstream input: fuzzing the worker's intake path, then the real worker.

The pure part runs :func:`streams.intake.intake` (the exact function the Faust agent calls for
every record) on ~12,000 generated records: truncated Avro, wrong magic bytes, unknown schema
ids, missing or blank ids, unknown event types, timestamps far in the future or past, oversized
properties, non-UTF-8 bytes, duplicate ids, control headers, random bytes and mutations of good
records. Every bad record must come back as a ``Rejected`` with a known reason (the DLQ header),
every good one as the event it encodes; nothing may raise.

The integration test feeds a few hundred such bad records, interleaved with the sample
clickstream, to a real ``nudgeflow worker`` on the embedded stack: every bad record lands on
``clickstream-dlq`` byte for byte with its reason, the worker stays up, and the decisions equal
``processors.commands.backtest.run_backtest`` on the good records alone.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.commands.backtest import run_backtest
from processors.core.campaign import load_campaigns
from processors.core.decision import Decision, DecisionCancelled
from processors.core.engine import Engine
from processors.core.events import (
    MAX_ID_LEN,
    MAX_KEY_LEN,
    MAX_PROPERTIES,
    MAX_TS_MS,
    MAX_VALUE_LEN,
    MIN_TS_MS,
    ClickEvent,
    validate,
)
from processors.files import LineErrors, read_events
from processors.kafka.control import FlushTracker, flush_headers, is_control
from processors.settings import REPO_ROOT, Settings
from schemas.codec import PINNED_IDS, Codec
from streams.intake import END_OF_INPUT, Rejected, intake
from streams.topics import CONTROL_HEADER, DLQ_REASON_HEADER
from tests.integration.test_streams_smoke import TopicReader, worker_env

REASONS = frozenset(
    {
        "unknown_control",
        "not_wire_format",
        "unknown_schema_id",
        "avro_decode_error",
        "wrong_record_type",
        "missing_event_id",
        "missing_user_id",
        "missing_event_type",
        "bad_event_id",
        "bad_user_id",
        "bad_event_type",
        "ts_out_of_range",
        "oversized_properties",
        "invalid_event",
        "key_mismatch",
    }
)
KNOWN_TYPES = ("add_to_cart", "purchase", "product_view", "page_view", "event_signup")
CLICK_ID = PINNED_IDS["ClickEvent"]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

# One codec (and mock registry) for the whole module, like one per worker process.
CODEC = Codec("mock://fuzz-clickstream")
CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"
EVENTS = REPO_ROOT / "examples" / "events.jsonl"
ENGINE = Engine(load_campaigns(CAMPAIGNS))


# ------------------------------------------------------------------ a hand-written Avro encoder
# The codec refuses to write bad records, so hostile bytes are built here (and checked against
# the codec for good ones in test_hand_encoder_matches_codec).


def avro_long(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    z &= (1 << 64) - 1
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def avro_bytes(b: bytes) -> bytes:
    return avro_long(len(b)) + b


def wire(body: bytes, schema_id: int = CLICK_ID, magic: int = 0) -> bytes:
    return bytes([magic]) + schema_id.to_bytes(4, "big") + body


def click_body(
    event_id: bytes,
    user_id: bytes,
    event_type: bytes,
    ts: int,
    session_id: bytes | None = None,
    properties: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    out = avro_bytes(event_id) + avro_bytes(user_id) + avro_bytes(event_type) + avro_long(ts)
    out += avro_long(0) if session_id is None else avro_long(1) + avro_bytes(session_id)
    if properties:
        out += avro_long(len(properties))
        out += b"".join(avro_bytes(k) + avro_bytes(v) for k, v in properties)
    return out + avro_long(0)


def record(event: ClickEvent) -> dict[str, Any]:
    return event.to_record()


def check_invariants(result: object, key: bytes | None) -> None:
    """What every intake result must satisfy, whatever the input."""
    assert isinstance(result, ClickEvent | Rejected) or result is END_OF_INPUT, result
    if isinstance(result, Rejected):
        assert result.reason in REASONS, result
        assert isinstance(result.detail, str) and result.detail, result
    elif isinstance(result, ClickEvent):
        assert validate(result) is result
        assert key == result.user_id.encode()


# ------------------------------------------------------------------ strategies

names = st.text(min_size=1, max_size=20).filter(lambda s: bool(s.strip()))
user_ids = names.filter(lambda s: not s.startswith("\x00"))  # NUL-first: the worker's own keys
event_types = st.sampled_from(KNOWN_TYPES) | names  # unknown types are valid events
timestamps = st.integers(MIN_TS_MS, MAX_TS_MS - 1)


@st.composite
def events(draw: st.DrawFn) -> ClickEvent:
    """Arbitrary valid events (any Unicode but surrogates; NUL, RTL marks and emoji included)."""
    return ClickEvent(
        event_id=draw(names),
        user_id=draw(user_ids),
        event_type=draw(event_types),
        ts=draw(timestamps),
        session_id=draw(st.none() | st.text(max_size=12)),
        properties=draw(st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=4)),
    )


# The hostile-input tests mutate good records drawn from a fixed, varied pool: generating a
# fresh event per example costs more than the check itself, and the mutation is what is fuzzed.
ODD = ("u1", "ü-ser", "用户-7", "\u202eevil\u202c", "a\x00b", "😀", " padded ", "tab\tbed",
       "\u200f\u200e", "x" * MAX_ID_LEN, "{{ 7*7 }}", "\ufeffbom", "line\nbreak",
       "\x1b[3m")  # fmt: skip


def _pool(n: int = 240) -> list[tuple[ClickEvent, bytes]]:
    rng = random.Random(20240313)
    types = (*KNOWN_TYPES, "unknown_type", "😀", "Add_To_Cart")
    out = []
    for i in range(n):
        props = {rng.choice(ODD)[:20]: rng.choice(ODD)[:60] for _ in range(rng.randrange(6))}
        event = ClickEvent(
            event_id=f"e{i}-{rng.choice(ODD)[:40]}",
            user_id=rng.choice(ODD),
            event_type=rng.choice(types),
            ts=rng.randrange(MIN_TS_MS, MAX_TS_MS),
            session_id=rng.choice([None, "", *ODD]),
            properties=props,
        )
        out.append((validate(event), CODEC.encode("ClickEvent", record(event))))
    return out


POOL = _pool()
pool = st.sampled_from(POOL)


invalid_utf8 = st.sampled_from(
    [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xf0\x28\x8c\xbc", b"\xc0"]
)


# ------------------------------------------------------------------ the pure intake path


def test_hand_encoder_matches_codec() -> None:
    event = ClickEvent("e1", "u1", "add_to_cart", 1_710_325_412_000, "s1", {"p": "9", "q": ""})
    body = click_body(b"e1", b"u1", b"add_to_cart", event.ts, b"s1", [(b"p", b"9"), (b"q", b"")])
    assert wire(body) == CODEC.encode("ClickEvent", record(event))
    assert wire(click_body(b"e", b"u", b"t", 0)) == CODEC.encode(
        "ClickEvent", {"event_id": "e", "user_id": "u", "event_type": "t", "ts": 0}
    )


@settings(FUZZ, max_examples=600)
@given(event=events())
def test_valid_records_including_unknown_types_and_duplicates_are_accepted(
    event: ClickEvent,
) -> None:
    value = CODEC.encode("ClickEvent", record(event))
    key = event.user_id.encode()
    first = intake(CODEC, key, value, ())
    assert first == event  # unknown event types are events, not dead letters
    # A duplicate (same bytes again) is not a bad record either: the engine drops it per user.
    assert intake(CODEC, key, value, ()) == event
    step = ENGINE.on_event(None, event)
    assert ENGINE.on_event(step.state, event).rejected == [(event, "duplicate")]


@settings(FUZZ, max_examples=1500)
@given(good=pool, at=st.integers(0, 2**16))
def test_truncated_avro_is_dead_lettered(good: tuple[ClickEvent, bytes], at: int) -> None:
    event, value = good
    cut = at % len(value)
    got = intake(CODEC, event.user_id.encode(), value[:cut])
    assert isinstance(got, Rejected)
    assert got.reason == ("not_wire_format" if cut < 5 else "avro_decode_error"), got


@settings(FUZZ, max_examples=1000)
@given(good=pool, magic=st.integers(1, 255))
def test_wrong_magic_byte_is_dead_lettered(good: tuple[ClickEvent, bytes], magic: int) -> None:
    event, value = good
    value = bytes([magic]) + value[1:]
    got = intake(CODEC, event.user_id.encode(), value)
    assert isinstance(got, Rejected) and got.reason == "not_wire_format", got
    if magic == ord("{"):
        assert "looks like JSON" in got.detail


@settings(FUZZ, max_examples=1000)
@given(
    good=pool,
    schema_id=st.integers(len(PINNED_IDS) + 1, 2**32 - 1) | st.integers(2, len(PINNED_IDS)),
)
def test_unknown_or_foreign_schema_id_is_dead_lettered(
    good: tuple[ClickEvent, bytes], schema_id: int
) -> None:
    event, value = good
    value = wire(value[5:], schema_id=schema_id)
    got = intake(CODEC, event.user_id.encode(), value)
    assert isinstance(got, Rejected), got
    if schema_id > len(PINNED_IDS):
        assert got.reason == "unknown_schema_id", got
    else:  # another NudgeFlow record's id: the body does not fit it, or it is not a ClickEvent
        assert got.reason in {"avro_decode_error", "wrong_record_type"}, got


@settings(FUZZ, max_examples=1000)
@given(
    good=pool,
    field=st.sampled_from(["user_id", "event_id", "event_type"]),
    blank=st.sampled_from(["", " ", "\t", "\n \r", "\u3000", "\u2028"]),
)
def test_missing_or_blank_ids_are_dead_lettered(
    good: tuple[ClickEvent, bytes], field: str, blank: str
) -> None:
    rec = {**record(good[0]), field: blank}
    value = CODEC.encode("ClickEvent", rec)
    got = intake(CODEC, rec["user_id"].encode(), value)
    assert isinstance(got, Rejected) and got.reason == f"missing_{field}", got


def test_writer_schema_without_user_id_is_dead_lettered() -> None:
    """A producer that registered its own ClickEvent without ``user_id``: the registry knows the
    id, but the record cannot be read as ours (no default for a required field)."""
    codec = Codec("mock://fuzz-rogue-producer")
    schema = codec.schema("ClickEvent")
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "user_id"]
    schema_id = codec.registry.register_schema(
        "rogue-producer-value", Schema(json.dumps(schema), "AVRO")
    )
    body = avro_bytes(b"e1") + avro_bytes(b"add_to_cart") + avro_long(1_710_325_412_000)
    got = intake(codec, b"u1", wire(body + avro_long(0) + avro_long(0), schema_id=schema_id))
    assert isinstance(got, Rejected) and got.reason == "avro_decode_error", got
    assert "cannot be read" in got.detail


@settings(FUZZ, max_examples=1000)
@given(
    good=pool,
    ts=st.integers(-(2**63), MIN_TS_MS - 1) | st.integers(MAX_TS_MS, 2**63 - 1),
)
def test_timestamps_far_in_the_past_or_future_are_dead_lettered(
    good: tuple[ClickEvent, bytes], ts: int
) -> None:
    event = good[0]
    value = CODEC.encode("ClickEvent", {**record(event), "ts": ts})
    got = intake(CODEC, event.user_id.encode(), value)
    assert isinstance(got, Rejected) and got.reason == "ts_out_of_range", got


@pytest.mark.parametrize("ts", [MIN_TS_MS, MAX_TS_MS - 1])
def test_timestamps_at_the_bounds_are_accepted(ts: int) -> None:
    event = ClickEvent("e1", "u1", "page_view", ts)
    assert intake(CODEC, b"u1", CODEC.encode("ClickEvent", record(event))) == event


@st.composite
def oversized(draw: st.DrawFn) -> dict[str, str]:
    kind = draw(st.sampled_from(["count", "key", "value"]))
    if kind == "count":
        n = draw(st.integers(MAX_PROPERTIES + 1, 3 * MAX_PROPERTIES))
        return {f"k{i}": "v" for i in range(n)}
    if kind == "key":
        return {"x" * draw(st.integers(MAX_KEY_LEN + 1, 4 * MAX_KEY_LEN)): "v"}
    return {"k": draw(st.sampled_from("ab€😀")) * draw(st.integers(MAX_VALUE_LEN + 1, 3 * 2048))}


@settings(FUZZ, max_examples=800)
@given(good=pool, props=oversized())
def test_oversized_properties_are_dead_lettered(
    good: tuple[ClickEvent, bytes], props: dict[str, str]
) -> None:
    event = good[0]
    value = CODEC.encode("ClickEvent", {**record(event), "properties": props})
    got = intake(CODEC, event.user_id.encode(), value)
    assert isinstance(got, Rejected) and got.reason == "oversized_properties", got


@settings(FUZZ, max_examples=300)
@given(good=pool, n=st.integers(MAX_ID_LEN + 1, 4 * MAX_ID_LEN))
def test_overlong_ids_are_dead_lettered(good: tuple[ClickEvent, bytes], n: int) -> None:
    event = good[0]
    user_id = "u" * n
    value = CODEC.encode("ClickEvent", {**record(event), "user_id": user_id})
    got = intake(CODEC, user_id.encode(), value)
    assert isinstance(got, Rejected) and got.reason == "bad_user_id", got


@settings(FUZZ, max_examples=200)
@given(good=pool, rest=st.text(max_size=20))
def test_user_ids_starting_with_nul_are_dead_lettered(
    good: tuple[ClickEvent, bytes], rest: str
) -> None:
    """The worker keeps its clickstream positions under NUL-prefixed keys in the state table
    (streams.state.checkpoint): a user id like that must never reach the table."""
    user_id = "\x00" + rest
    value = CODEC.encode("ClickEvent", {**record(good[0]), "user_id": user_id})
    got = intake(CODEC, user_id.encode(), value)
    assert isinstance(got, Rejected) and got.reason == "bad_user_id", got


@settings(FUZZ, max_examples=1000)
@given(
    good=pool,
    where=st.sampled_from(["event_id", "user_id", "event_type", "session", "prop_key", "prop"]),
    bad=invalid_utf8,
    prefix=st.sampled_from([b"", b"a", b"ok ", b"\x00", b"\xc3\xa9"]),  # "é" is valid UTF-8
)
def test_non_utf8_strings_are_dead_lettered(
    good: tuple[ClickEvent, bytes], where: str, bad: bytes, prefix: bytes
) -> None:
    event = good[0]
    junk = prefix + bad
    fields = {
        "event_id": event.event_id.encode(),
        "user_id": event.user_id.encode(),
        "event_type": event.event_type.encode(),
    }
    session: bytes | None = None
    props: list[tuple[bytes, bytes]] = []
    if where in fields:
        fields[where] = junk
    elif where == "session":
        session = junk
    else:
        props = [(junk, b"v")] if where == "prop_key" else [(b"k", junk)]
    body = click_body(fields["event_id"], fields["user_id"], fields["event_type"], event.ts,
                      session, props)  # fmt: skip
    got = intake(CODEC, fields["user_id"], wire(body))
    assert isinstance(got, Rejected) and got.reason == "avro_decode_error", got
    assert "UTF-8" in got.detail


@settings(FUZZ, max_examples=500)
@given(good=pool, key=st.none() | st.binary(max_size=30))
def test_records_keyed_by_anything_but_the_user_id_are_dead_lettered(
    good: tuple[ClickEvent, bytes], key: bytes | None
) -> None:
    event, value = good
    got = intake(CODEC, key, value)
    if key == event.user_id.encode():
        assert got == event
    else:  # includes keys that are not UTF-8
        assert isinstance(got, Rejected) and got.reason == "key_mismatch", got
        assert got.event == event  # decoded: the metrics still count its event type


@settings(FUZZ, max_examples=500)
@given(
    good=pool,
    control=st.sampled_from([b"flush", b"", b"FLUSH", b"flush ", b"pause"]) | st.binary(max_size=9),
    headers_as=st.sampled_from(["pairs", "mapping"]),
)
def test_control_headers_other_than_flush_are_dead_lettered(
    good: tuple[ClickEvent, bytes], control: bytes, headers_as: str
) -> None:
    event, value = good
    pairs = [("x-trace", b"1"), (CONTROL_HEADER, control)]
    headers: Any = dict(pairs) if headers_as == "mapping" else tuple(pairs)
    got = intake(CODEC, event.user_id.encode(), value, headers)
    if control == b"flush":
        assert got is END_OF_INPUT
    else:
        assert isinstance(got, Rejected) and got.reason == "unknown_control" and got.control


def mutate(good: bytes, seed: int) -> bytes:
    """``good`` with 1-4 bytes flipped, runs of bytes inserted or deleted (classic fuzzing; one
    seed per example keeps Hypothesis' per-example cost low, and a failure prints the seed)."""
    rng = random.Random(seed)
    value = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.choice("fid"), rng.randrange(max(1, len(value)))
        if op == "f" and value:
            value[at] ^= rng.randrange(1, 256)
        elif op == "i":
            value[at:at] = rng.randbytes(rng.randint(1, 8))
        elif value:
            del value[at : at + rng.randint(1, 3)]
    return bytes(value)


@settings(FUZZ, max_examples=2000)
@given(good=pool, seed=st.integers(0, 2**32))
def test_mutated_records_never_raise(good: tuple[ClickEvent, bytes], seed: int) -> None:
    key = good[0].user_id.encode()
    check_invariants(intake(CODEC, key, mutate(good[1], seed)), key)


@settings(FUZZ, max_examples=700)
@given(key=st.none() | st.binary(max_size=8), value=st.none() | st.binary(max_size=48))
def test_random_bytes_never_raise(key: bytes | None, value: bytes | None) -> None:
    check_invariants(intake(CODEC, key, value), key)


# ------------------------------------------------------------------ the real worker


CATEGORIES = {
    "not_wire_format",
    "unknown_schema_id",
    "avro_decode_error",
    "missing_user_id",
    "ts_out_of_range",
    "oversized_properties",
    "key_mismatch",
}


def bad_records(rng: random.Random, n: int) -> list[tuple[bytes | None, bytes, str]]:
    """``n`` hostile records (key, value, expected reason), one category after another."""
    out: list[tuple[bytes | None, bytes, str]] = []
    base = ClickEvent("bad-0", "u-ana", "add_to_cart", 1_710_316_800_000, "s", {"p": "1"})
    good = CODEC.encode("ClickEvent", record(base))
    makers = [
        lambda: (b"u-ana", good[: rng.randrange(0, len(good))]),  # truncated
        lambda: (b"u-ben", bytes([rng.randrange(1, 256)]) + good[1:]),  # wrong magic byte
        lambda: (b"u-dev", wire(good[5:], schema_id=rng.randrange(100, 2**31))),  # unknown id
        lambda: (b"", CODEC.encode("ClickEvent", {**record(base), "user_id": ""})),
        lambda: (b"u-ana", CODEC.encode("ClickEvent", {**record(base), "ts": 10**15})),
        lambda: (b"u-ana", CODEC.encode("ClickEvent", {**record(base), "ts": 1_000})),
        lambda: (
            b"u-ben",
            CODEC.encode(
                "ClickEvent",
                {
                    **record(base),
                    "user_id": "u-ben",
                    "properties": {f"k{i}": "v" for i in range(99)},
                },
            ),
        ),
        lambda: (b"u-dev", wire(click_body(b"e", b"u-dev", b"t\xff\xfe", base.ts))),  # not UTF-8
        lambda: (rng.randbytes(6), good),  # key is not the user id (and maybe not UTF-8)
        lambda: (b"u-ana", rng.randbytes(rng.randrange(0, 40))),  # garbage
        lambda: (None, b""),  # tombstone-like
    ]
    while len(out) < n:
        key, value = makers[len(out) % len(makers)]()
        got = intake(CODEC, key, value)
        assert isinstance(got, Rejected), (key, value)
        out.append((key, value, got.reason))
    return out


def _start_worker(settings: Settings, cwd: Path) -> subprocess.Popen[bytes]:
    with (cwd / "worker.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("nudgeflow")), "worker",
             "--campaigns", str(CAMPAIGNS), "--clock", "event"],
            env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
        )  # fmt: skip


def test_worker_dead_letters_fuzzed_records_and_decides_as_backtest(
    settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(8)
    codec = Codec(settings.schema_registry_url)
    good = list(read_events(EVENTS, LineErrors(str(EVENTS), echo=None)))
    good += [good[5], good[40]]  # duplicate ids: dropped by the engine, not dead-lettered
    bad = bad_records(rng, 330)
    stream: list[tuple[bytes | None, bytes, str | None]] = [
        (e.user_id.encode(), codec.encode("ClickEvent", record(e)), None) for e in good
    ]
    for item in bad:  # interleave: each bad record at a random place, good order unchanged
        stream.insert(rng.randrange(0, len(stream) + 1), item)
    expected = run_backtest(good, load_campaigns(CAMPAIGNS))

    dlq = TopicReader(settings, settings.topic_clickstream_dlq)
    out = TopicReader(settings, settings.topic_decisions)
    proc = _start_worker(settings, tmp_path)  # own cwd: Faust puts its data directory there
    log = tmp_path / "worker.log"

    def alive() -> None:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()}")

    try:
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        n = settings.partitions
        for key, value, _reason in stream:
            # a record without a usable key still needs a partition: spread them
            part = {} if key else {"partition": rng.randrange(n)}
            producer.produce(settings.topic_clickstream, key=key, value=value, **part)
        for p in range(n):
            producer.produce(settings.topic_clickstream, value=b"", partition=p,
                             headers=flush_headers(p, n))  # fmt: skip
        assert producer.flush(30) == 0

        tracker = FlushTracker(partitions=set(range(n)))
        observed = [0]

        def flushed(messages: list[Any]) -> bool:
            for m in messages[observed[0] :]:
                tracker.observe(m.partition(), m.headers())
            observed[0] = len(messages)
            return tracker.all_complete()

        out.read_until(flushed, 90, alive)
        assert tracker.all_complete(), "the worker never forwarded end of input"
        engine_rejects = sum(v for k, v in expected.rejected.items() if k != "duplicate")
        dead = dlq.read_until(lambda ms: len(ms) >= len(bad) + engine_rejects, 30, alive)
        dlq.drain(1.0)
        alive()  # still up after every bad record

        # every bad record, byte for byte, with its reason
        got_dead = Counter(
            (m.key(), m.value(), dict(m.headers())[DLQ_REASON_HEADER].decode()) for m in dead
        )
        want_dead = Counter((k, v, r) for k, v, r in bad)
        assert not want_dead - got_dead, want_dead - got_dead
        assert len(dead) == len(bad) + engine_rejects
        reasons = Counter(r for _k, _v, r in bad)
        assert CATEGORIES <= set(reasons)

        # the good records decide exactly as the backtest does on them alone
        decisions: dict[str, Decision] = {}
        cancels: list[DecisionCancelled] = []
        for m in out.messages:
            if is_control(m.headers()):
                continue
            name, rec = codec.decode(m.value())
            if name == "TriggerDecision":
                d = Decision.from_record(rec)
                decisions[d.decision_id] = d
            else:
                c = DecisionCancelled.from_record(rec)
                if c.reason == "reordered":
                    decisions.pop(c.decision_id, None)
                else:
                    cancels.append(c)
        live = sorted(decisions.values(), key=lambda d: (d.fire_at, d.decision_id))
        assert [d.to_json() for d in live] == [d.to_json() for d in expected.decisions]
        assert len(expected.decisions) >= 5, "the sample clickstream should trigger texts"
        assert sorted(c.decision_id for c in cancels) == sorted(
            c.decision_id for c in expected.cancellations
        )
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
        print(
            f"\nfuzzed worker run: {len(good)} good, {len(bad)} bad "
            f"({dict(sorted(reasons.items()))}), {len(live)} decisions"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        dlq.close()
        out.close()
