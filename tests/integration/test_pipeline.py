"""End to end: real Apache Kafka, real redis-server, the Faust worker and the dispatcher as
separate processes (``nudgeflow demo``), compared with ``nudgeflow backtest`` on the same input."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client.parser import text_string_to_metric_families

from processors.commands.backtest import run_backtest
from processors.core.campaign import load_campaigns
from processors.demo.run import EXAMPLES, run_demo
from processors.files import LineErrors, read_events

pytestmark = pytest.mark.integration

CAMPAIGNS = EXAMPLES / "campaigns.yaml"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _backtest(events: Path) -> set[tuple[str, str, str, str]]:
    result = run_backtest(read_events(events, LineErrors(str(events))), load_campaigns(CAMPAIGNS))
    return {
        (d.decision_id, d.campaign_id, d.user_id, d.to_json()["fire_at"]) for d in result.decisions
    }


def _decided(out: Path) -> set[tuple[str, str, str, str]]:
    return {(d["decision_id"], d["campaign_id"], d["user_id"], d["fire_at"])
            for d in _lines(out / "decisions.jsonl")}  # fmt: skip


def test_abandoned_cart_is_texted_and_bought_cart_is_not(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    rows = [
        # u-ana abandons a cart; u-ben buys 10 minutes after adding to cart
        {"event_id": "a1", "user_id": "u-ana", "event_type": "add_to_cart",
         "ts": "2024-03-13T17:00:00Z", "session_id": "s1",
         "properties": {"product_name": "trail shoes"}},
        {"event_id": "b1", "user_id": "u-ben", "event_type": "add_to_cart",
         "ts": "2024-03-13T17:00:00Z", "session_id": "s2", "properties": {}},
        {"event_id": "b2", "user_id": "u-ben", "event_type": "purchase",
         "ts": "2024-03-13T17:10:00Z", "session_id": "s2", "properties": {}},
    ]  # fmt: skip
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    events.write_text(text)
    out = tmp_path / "out"
    assert run_demo(events, CAMPAIGNS, EXAMPLES / "contacts.jsonl", out) == 0
    decisions = _lines(out / "decisions.jsonl")
    assert [(d["campaign_id"], d["user_id"], d["fire_at"]) for d in decisions] == [
        ("cart-recovery", "u-ana", "2024-03-13T17:30:00Z")
    ]
    assert decisions[0]["trigger_event_ids"] == ["a1"]
    outbox = _lines(out / "outbox.jsonl")
    assert [(m["user_id"], m["to"], m["decision_id"]) for m in outbox] == [
        ("u-ana", "+14155550100", decisions[0]["decision_id"])
    ]
    assert outbox[0]["text"].startswith("Hi Ana, you left trail shoes in your cart")
    assert outbox[0]["sent_at"] == "2024-03-13T17:30:00Z"  # virtual time of the replay
    assert outbox[0]["segments"] == 1 and outbox[0]["encoding"] == "GSM-7"
    outcomes = _lines(out / "outcomes.jsonl")
    assert [(o["decision_id"], o["status"]) for o in outcomes] == [
        (decisions[0]["decision_id"], "sent")
    ]


def test_demo_on_sample_data_matches_backtest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    events = EXAMPLES / "events.jsonl"
    inbound = tmp_path / "inbound.jsonl"  # Farid replies STOP after the signup confirmation
    inbound.write_text(
        '{"msisdn": "12125550105", "text": "Stop please", "ts": "2024-03-14T10:00:00Z"}\n'
        '{"msisdn": "+14155550100", "text": "HELP", "ts": "2024-03-13T10:00:00Z"}\n'
        "not json\n"
    )
    assert run_demo(events, CAMPAIGNS, EXAMPLES / "contacts.jsonl", out, inbound=inbound) == 0
    assert _decided(out) == _backtest(events)
    sent_to = {m["user_id"] for m in _lines(out / "outbox.jsonl")}
    assert "u-ana" in sent_to and "u-ben" not in sent_to
    assert "u-hugo" not in sent_to and "u-ivy" not in sent_to  # opted out / no contact
    final = {o["decision_id"]: o for o in _lines(out / "outcomes.jsonl")}
    assert set(final) == {d[0] for d in _decided(out)}  # every decision has an outcome
    farid = {o["campaign_id"]: (o["status"], o["reason"]) for o in final.values()
             if o["user_id"] == "u-farid"}  # fmt: skip
    assert farid == {
        "signup-confirm": ("sent", None),
        "event-reminder": ("suppressed", "opted_out"),
    }
    # metrics.prom: the components' final counters agree with the files
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families((out / "metrics.prom").read_text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def total(name: str, **labels: str) -> float:
        return sum(
            v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)
        )

    assert total("nudgeflow_events_consumed_total") == len(_lines(events))
    assert total("nudgeflow_decisions_total") == len(final)
    statuses = [o["status"] for o in final.values()]
    assert total("nudgeflow_sms_sent_total") == statuses.count("sent") > 0
    for reason in ("opted_out", "no_contact"):
        expected = sum(o["reason"] == reason for o in final.values())
        assert total("nudgeflow_sms_suppressed_total", reason=reason) == expected > 0
    assert total("nudgeflow_sms_deferred") == 0  # every deferral was released


ZONES = ["America/Los_Angeles", "America/New_York", "Europe/London", "Asia/Kolkata", None]


def _contacts_for(users: int, path: Path) -> dict[str, dict]:
    """Contacts for the simulated users: mixed consent, zones (some only from the number)."""
    rows = {}
    for n in range(1, users + 1):
        uid = f"u{n:06d}"
        if n % 10 == 0:
            continue  # no contact on file
        zone = ZONES[n % len(ZONES)]
        phone = f"+1415555{n:04d}" if zone != "Asia/Kolkata" else f"+9198765{n:05d}"
        row = {"user_id": uid, "phone": phone, "first_name": f"N{n}",
               "consent": "opted_out" if n % 7 == 0 else "opted_in"}  # fmt: skip
        if zone:
            row["timezone"] = zone
        rows[uid] = row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return rows


def _local(iso: str, zone: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))


def test_generated_clickstream_live_path_equals_backtest_and_obeys_policy(tmp_path: Path) -> None:
    from processors.simulate import generate

    events = tmp_path / "sim.jsonl"
    with events.open("w") as fh:
        for e in generate(users=2_000, events=20_000, seed=11):
            fh.write(json.dumps(e.to_json()) + "\n")
    contacts = _contacts_for(2_000, tmp_path / "contacts.jsonl")
    out = tmp_path / "out"
    # 1,000+ texts: at the default 30/s the pacing alone took ~40 s (the rate has its own tests)
    assert (
        run_demo(events, CAMPAIGNS, tmp_path / "contacts.jsonl", out, timeout_s=240, rate_per_s=500)
        == 0
    )
    expected = _backtest(events)
    assert len(expected) > 500
    assert _decided(out) == expected

    # Every decision ends in exactly one final outcome; texts match the sent outcomes.
    outcomes = _lines(out / "outcomes.jsonl")
    final = {o["decision_id"]: o for o in outcomes}
    assert set(final) == {d[0] for d in expected}
    assert all(o["status"] != "deferred" for o in final.values())
    outbox = _lines(out / "outbox.jsonl")
    sent = {k for k, o in final.items() if o["status"] == "sent"}
    assert sorted(m["decision_id"] for m in outbox) == sorted(sent)  # each text once
    assert len(sent) > 100
    reasons = {o["reason"] for o in final.values() if o["status"] == "suppressed"}
    assert {"no_contact", "opted_out", "frequency_cap"} <= reasons
    assert any(o["status"] == "deferred" for o in outcomes)  # quiet hours were exercised

    by_user: dict[str, list[datetime]] = {}
    for m in outbox:
        c = contacts[m["user_id"]]  # never a text without a contact…
        assert c["consent"] == "opted_in"  # …or without consent
        assert m["to"] == c["phone"]
        zone = c.get("timezone") or ("Asia/Kolkata" if c["phone"].startswith("+91") else
                                     "America/Los_Angeles")  # fmt: skip
        local = _local(m["sent_at"], zone)
        assert 9 <= local.hour < 20, (m["user_id"], m["sent_at"], zone)  # quiet 20:00-09:00
        by_user.setdefault(m["user_id"], []).append(local)
    for times in by_user.values():  # caps: 1 per 4 h and 3 per 7 d, on send times
        times.sort()
        for a, b in zip(times, times[1:], strict=False):
            assert (b - a).total_seconds() >= 4 * 3600
        for i in range(len(times) - 3):
            assert (times[i + 3] - times[i]).total_seconds() >= 7 * 86400
