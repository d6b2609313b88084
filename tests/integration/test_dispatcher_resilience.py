"""Issue 8 and the batched policy (issue 7): ambiguous gateway failures, dead letters that
survive a crash, a Redis outage mid-run, and batches deciding exactly like one at a time.

Unit tests run the policy over :class:`InMemoryStore`; the rest use the session broker, a real
redis-server (the session's, or one of their own where it is stopped and restarted) and the
vonage SDK against the local HTTPS fake."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis

from processors import metrics
from processors.commands.contacts import import_contacts
from processors.core.campaign import parse_campaigns
from processors.core.cap import CapRule
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy import Policy, RetryPolicy, SendPlan, Step, deliver
from processors.core.policy.memory import InMemoryStore
from processors.core.quiet_hours import QuietHours, quiet_until
from processors.devstack.processes import free_ports
from processors.dispatcher import make_gateway
from processors.gateways.base import (
    AmbiguousGatewayError,
    PermanentGatewayError,
    SendResult,
    SmsMessage,
)
from processors.redis import RedisStore
from processors.settings import Settings
from tests.fakes.vonage_fake import VonageFake
from tests.integration.test_dispatcher import (
    Bus,
    Reader,
    campaign_doc,
    contact_rows,
    daytime_zone,
    dispatching,
    fake,  # noqa: F401 - fixture
    refs,
    vsettings,  # noqa: F401 - fixture
    write_jsonl,
)

NOW = 1_710_349_200_000  # 2024-03-13T17:00:00Z: 10:00 in Los Angeles


def _decision(did: str, user: str = "u-ana", campaign: str = "cart", at: int = NOW) -> Decision:
    return Decision(did, campaign, user, at, (f"e-{did}",), at)


def _policy(store: Any, doc: dict[str, Any] | None = None, event_clock: bool = True) -> Policy:
    return Policy(parse_campaigns(doc or campaign_doc()), store, event_clock=event_clock)


ANA = Contact("u-ana", "+14155550100", "opted_in", timezone="America/Los_Angeles")


def _plan(policy: Policy, did: str = "d1") -> SendPlan:
    step = policy.on_decision(_decision(did), NOW)
    assert step.send is not None, step.outcomes
    assert policy.begin_call(step.send) is None
    return step.send


# --------------------------------------------------------------------------- ambiguous failures


def test_ambiguous_gateway_error_is_not_retried_not_dead_lettered_and_never_resent() -> None:
    store = InMemoryStore(contacts={"u-ana": ANA})
    policy = _policy(store)
    plan = _plan(policy)
    calls: list[str] = []

    def timeout(msg: SmsMessage) -> SendResult:
        calls.append(msg.decision_id)
        raise AmbiguousGatewayError("timeout")

    result = deliver(plan, timeout, RetryPolicy(attempts=5), sleep=lambda s: None)
    assert isinstance(result, AmbiguousGatewayError) and calls == ["d1"]  # never retried
    step = policy.complete(plan, result, NOW)
    assert [(o.status, o.reason) for o in step.outcomes] == [("failed", "unknown_after_timeout")]
    assert step.dead_letter is None  # not known to have failed
    assert store.entries["d1"].state == "done"  # out of "calling": never sent again
    # It may have been delivered: its cap slot is kept (the default cap: 1 per 4 h).
    other = policy.on_decision(_decision("d2", campaign="promo"), NOW + 1)
    assert [(o.status, o.reason) for o in other.outcomes] == [("suppressed", "frequency_cap")]
    # A redelivery re-publishes the recorded outcome (not yet marked published), no text.
    again = policy.on_decision(_decision("d1"), NOW + 2)
    assert again.send is None and again.dead_letter is None
    assert [o.reason for o in again.outcomes] == ["unknown_after_timeout"]


# --------------------------------------------------------------------------- dead letters


def test_redelivered_permanent_failure_re_produces_its_dead_letter_until_published() -> None:
    store = InMemoryStore(contacts={"u-ana": ANA})
    policy = _policy(store)
    plan = _plan(policy)
    failed = policy.complete(plan, PermanentGatewayError("barred"), NOW)
    assert failed.dead_letter == (plan.decision, "barred")
    # Killed before the commit: the redelivery brings the outcome and the dead letter back.
    again = policy.on_decision(_decision("d1"), NOW + 1)
    assert [o.reason for o in again.outcomes] == ["barred"] and again.send is None
    assert again.dead_letter == (plan.decision, "barred")
    # Once published (and committed), a redelivery produces nothing.
    store.mark_emitted(plan.decision, "failed")
    assert policy.on_decision(_decision("d1"), NOW + 2) == Step()


def test_redis_store_keeps_the_dead_letter_flag(redis_client: redis.Redis) -> None:
    store = RedisStore(redis_client, emit_grace_ms=0)  # a redelivery after the owner died
    store.put_contact("u-ana", ANA.to_record(), 1)
    policy = _policy(store)
    plan = _plan(policy)
    assert policy.complete(plan, PermanentGatewayError("barred"), NOW).dead_letter is not None
    again = policy.on_decision(_decision("d1"), NOW + 1)
    assert again.dead_letter == (plan.decision, "barred")
    # a suppression recorded later for another decision carries no flag
    assert policy.on_decision(_decision("d2"), NOW + 2).dead_letter is None


def test_keyword_timeline_holds_from_its_time_and_skips_unreadable_entries(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """``demo --inbound``: a STOP holds for checks at or after its time only; an entry that
    ``record_keyword`` cannot have written is skipped, so the STOP before it still holds (and
    the log line has no number)."""
    store = RedisStore(redis_client)
    store.put_contact("u-ana", ANA.to_record(), 1)
    store.record_keyword(ANA.phone, "opted_out", NOW)
    before, after = store.contact("u-ana", as_of=NOW - 1), store.contact("u-ana", as_of=NOW)
    assert before is not None and before.consent == "opted_in"
    assert after is not None
    assert (after.consent, after.consent_at_ms, after.consent_source) == (
        "opted_out",
        NOW,
        "sms:keyword",
    )
    key = f"{store.phone_prefix}{ANA.phone}:timeline"
    redis_client.zadd(key, {f"{NOW + 5}:maybe": NOW + 5})
    with caplog.at_level("WARNING", logger="processors.redis"):
        later = store.contact("u-ana", as_of=NOW + 10)
    assert later is not None and later.consent == "opted_out"
    assert "unreadable keyword timeline entry" in caplog.text
    assert ANA.phone not in caplog.text
    with pytest.raises(ValueError):
        store.record_keyword(ANA.phone, "maybe", NOW)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("most_passes", [None, 1])
def test_batched_policy_decides_exactly_like_one_at_a_time(
    redis_client: redis.Redis, most_passes: int | None
) -> None:
    """``prepare_many`` + ``settle_many`` (the live dispatcher's batches) against ``on_decision``
    one by one, on two key prefixes of one Redis: same outcomes, same texts, same cap slots.
    With ``most_passes=1`` every batch stops at its first text to send and the rest is prepared
    again, with the same attempt tokens, in the next batch (the dispatcher's room for sends)."""
    doc = campaign_doc(caps=[{"max": 2, "per": "4h"}], cart={"caps": [{"max": 1, "per": "1d"}]})
    contacts = [Contact.from_record(dict(r, consent={"status": r["consent"]}))
                for r in contact_rows("Etc/GMT+7")]  # fmt: skip
    items: list[Decision | DecisionCancelled] = [
        _decision("a1", "u-ana"),
        _decision("a2", "u-ana"),  # cart 1/day: capped
        _decision("a3", "u-ana", "promo"),
        _decision("a4", "u-ana", "promo"),  # global 2/4h: capped
        _decision("b1", "u-ben"),
        _decision("h1", "u-hugo"),  # opted out
        _decision("n1", "u-una"),  # no consent
        _decision("z1", "u-zed"),  # no contact
        _decision("b1", "u-ben"),  # the same decision again in the batch
        DecisionCancelled("r2", "cart", "u-ravi", "converted", NOW),
        _decision("r1", "u-ravi"),
        _decision("r2", "u-ravi"),  # cancelled before it arrived
        _decision("s1", "u-bea"),  # the handset texted STOP
    ]
    results: dict[str, list[tuple[Any, ...]]] = {}
    stored: dict[str, list[tuple[str, bytes]]] = {"one:": [], "batch:": []}
    batches = 0
    for prefix in ("one:", "batch:"):
        store = RedisStore(redis_client, prefix)
        redis_client.delete(*redis_client.keys(f"{prefix}*") or ["-"])
        for c in contacts:
            store.put_contact(c.user_id, c.to_record(), 1)
        store.set_phone_consent("+14155550103", "opted_out", NOW - 1, "sms:STOP")
        policy = _policy(store, doc, event_clock=False)
        steps: list[Step] = []
        if prefix == "one:":
            for item in items:
                if isinstance(item, Decision):
                    steps.append(policy.on_decision(item, NOW))
                else:
                    steps.append(policy.on_cancel(item, NOW))
        else:
            steps += [policy.on_cancel(i, NOW) for i in items if isinstance(i, DecisionCancelled)]
            queue = [(i, policy.token()) for i in items if isinstance(i, Decision)]
            while queue:
                batches += 1
                prepared = zip(queue, store.prepare_many(queue), strict=True)
                pending = [policy.steps.start(d, NOW, t, prior, reads)
                           for (d, t), (prior, reads) in prepared]  # fmt: skip
                to_settle = [p for p in pending if not isinstance(p, Step)]
                done = store.settle_many(to_settle, most_passes=most_passes)
                settled = iter(done)
                ran = [i for i, p in enumerate(pending) if not isinstance(p, Step)]
                # the store stopped after len(done) of them: the rest goes into the next batch
                cut = ran[len(done)] if len(done) < len(ran) else len(queue)
                for p in pending[:cut]:
                    violated, recorded = (None, False) if isinstance(p, Step) else next(settled)
                    steps.append(policy.settled(p, violated, recorded))
                queue = queue[cut:]
        seen: list[tuple[Any, ...]] = []
        for step in steps:
            seen += [(o.decision_id, o.status, o.reason, o.rule) for o in step.outcomes]
            if step.send is not None:
                seen.append((step.send.decision.decision_id, "send", step.send.message.text))
        ana_sends = redis_client.zrange(f"{prefix}{{u-ana}}:sends", 0, -1)
        results[prefix] = sorted(seen) + [("ana-slots", tuple(sorted(ana_sends)))]  # type: ignore[list-item]
        # the recorded outcomes (what a redelivery re-publishes) are the published ones
        for d in items:
            raw = redis_client.hget(f"{prefix}{{{d.user_id}}}:d:{d.decision_id}", "o")
            if raw is not None:
                stored[prefix].append((d.decision_id, raw))
    assert results["one:"] == results["batch:"]
    assert stored["one:"] and sorted(stored["one:"]) == sorted(stored["batch:"])
    # cut after the texts of a1, a3, b1 (twice: "lost" to the second at its call) and r1
    assert batches == (1 if most_passes is None else 6)
    assert ("a2", "suppressed", "frequency_cap", "cart:1/1d") in results["batch:"]
    assert ("a4", "suppressed", "frequency_cap", "global:2/4h") in results["batch:"]
    assert ("r2", "cancelled", "converted", None) in results["batch:"]
    assert ("s1", "suppressed", "opted_out", None) in results["batch:"]


def test_an_attempt_preparing_again_is_not_busy_with_itself(redis_client: redis.Redis) -> None:
    """A batch cut short prepares its rest again with the same tokens: an unpublished outcome
    whose lease that very attempt holds is handed back to it; any other attempt must wait."""
    store = RedisStore(redis_client, "again:")
    d = _decision("g1")
    outcome = SmsOutcome("g1", "cart", "u-ana", "suppressed", NOW, reason="holdout")
    key = "again:{u-ana}:d:g1"
    redis_client.delete(key)
    lease = int(time.time() * 1000) + 60_000
    redis_client.hset(key, mapping={"s": "done", "o": outcome.dumps(), "os": "suppressed",
                                    "l": lease, "t": "tok-a"})  # fmt: skip
    ((prior, _reads),) = store.prepare_many([(d, "tok-a")])
    assert (prior.state, prior.outcome, prior.emitted) == ("done", outcome, False)
    ((prior, _reads),) = store.prepare_many([(d, "tok-b")])
    assert prior.state == "busy" and prior.wait_ms > 0


def test_the_policys_quiet_hours_memo_answers_like_quiet_until() -> None:
    """The batch path memoizes UTC minutes found outside quiet hours: every instant across DST
    changes (also Lord Howe's 30-minute one) and quiet-hour edges, in order and backwards."""
    policy = _policy(InMemoryStore())
    quiet = QuietHours(start=dtime(20, 0), end=dtime(9, 0))
    days = {  # a day with a clock change (Lord Howe: back by 30 minutes), or a +5:45 zone
        "America/Los_Angeles": 1_710_028_800_000,  # 2024-03-10T00:00Z
        "Australia/Lord_Howe": 1_712_361_600_000,  # 2024-04-06T00:00Z
        "Asia/Kathmandu": 1_710_028_800_000,
    }
    for name, start in days.items():
        zone = ZoneInfo(name)
        instants = range(start - 43_200_000, start + 129_600_000, 41_000)
        for at in [*instants, *reversed(instants)]:
            memo = policy.steps._quiet_until(quiet, at, zone)
            assert memo == quiet_until(quiet, at, zone), (name, at)
    assert policy.steps._open_minutes  # the memo was used


# --------------------------------------------------------------------------- dispatcher helpers


class AmbiguousGateway:
    """Every request "times out after it was written": the text may have gone out."""

    name = "ambiguous-test"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def send(self, msg: SmsMessage) -> SendResult:
        self.calls.append(msg.decision_id)
        raise AmbiguousGatewayError("timeout")

    def close(self) -> None:
        pass


def test_dispatcher_ends_an_ambiguous_send_as_unknown_without_dead_letter(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    live = settings.model_copy(update={"clock": "live"})
    import_contacts(write_jsonl(tmp_path / "c.jsonl", contact_rows(daytime_zone())), live)
    gateway = AmbiguousGateway()
    reader = Reader(live, live.topic_outcomes)
    with dispatching(live, campaign_doc(), gateway) as (d, _thread):
        Bus(live).send(_decision("d-amb", "u-ana", at=int(time.time() * 1000)))
        final = reader.wait_final({"d-amb"})
        time.sleep(0.5)  # a retry or a second outcome would show up now
        reader.poll_until(lambda: True)
        assert d.error is None
    assert (final["d-amb"].status, final["d-amb"].reason) == ("failed", "unknown_after_timeout")
    assert gateway.calls == ["d-amb"] and len(reader.outcomes) == 1
    assert redis_client.hget("nudgeflow:{u-ana}:d:d-amb", "s") == b"done"
    dlq = Reader(live, live.topic_sms_dlq)
    time.sleep(0.5)
    dlq.poll_until(lambda: True)
    assert dlq.records == []
    reader.close()
    dlq.close()


# --------------------------------------------------------------------------- Redis outage


def _free_port() -> int:
    return free_ports(1)[0]


class OwnRedis:
    """A redis-server of this test's own, stopped and started again on the same port; it saves
    on shutdown and loads at start, like a restarted production Redis with persistence."""

    def __init__(self, workdir: Path) -> None:
        self.dir, self.port = workdir, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "3600 1", "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: saves the dataset, then exits
            self.proc.wait(10)
        self.proc = None


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_redis_outage_pauses_dispatching_and_resumes_without_loss_or_double_send(
    vsettings: Settings,  # noqa: F811 - fixture
    fake: VonageFake,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    try:
        settings = vsettings.model_copy(update={"clock": "live", "redis_url": own.url})
        import_contacts(write_jsonl(tmp_path / "c.jsonl", contact_rows(daytime_zone())), settings)
        users = ["u-ana", "u-ben", "u-ravi", "u-bea"]
        now = int(time.time() * 1000)
        before = [_decision(f"d-before-{u}", u, at=now) for u in users]
        during = [_decision(f"d-during-{u}", u, "promo", at=now) for u in users]
        during += [_decision("d-during-hugo", "u-hugo", at=now)]
        bus = Bus(settings)
        reader = Reader(settings, settings.topic_outcomes)
        doc = campaign_doc(caps=[])
        with dispatching(settings, doc, make_gateway(settings)) as (d, thread):
            bus.send(*before)
            reader.wait_final({x.decision_id for x in before})
            own.stop()
            _wait(lambda: d.redis_down, 10, "outage not noticed")
            assert metrics.sample_value("nudgeflow_dispatcher_redis_up") == 0
            calls_before = len(fake.requests)
            bus.send(*during)
            time.sleep(2.0)  # decisions arrive while Redis is down
            reader.poll_until(lambda: True)
            assert len(fake.requests) == calls_before  # no gateway call during the outage
            assert not {x.decision_id for x in during} & set(reader.final())
            assert thread.is_alive() and d.error is None and not d.stopping
            own.start()
            final = reader.wait_final({x.decision_id for x in during}, timeout_s=20)
            assert metrics.sample_value("nudgeflow_dispatcher_redis_up") == 1
            time.sleep(0.5)  # a duplicate would show up now
            reader.poll_until(lambda: True)
        per_decision = Counter(o.decision_id for o in reader.outcomes)
        assert set(per_decision.values()) == {1}, per_decision  # exactly one outcome each
        assert set(per_decision) == {x.decision_id for x in before + during}
        client_refs = refs(fake)
        assert len(client_refs) == len(set(client_refs)) == 8  # each client-ref at most once
        assert {o.status for o in final.values() if o.user_id != "u-hugo"} == {"sent"}
        assert (final["d-during-hugo"].status, final["d-during-hugo"].reason) == (
            "suppressed",
            "opted_out",
        )
        reader.close()
    finally:
        own.stop()


def test_cap_rules_are_shared_between_batches_and_one_at_a_time() -> None:
    """Guard for ``settle_many``'s argument layout: the rule fields it sends are the ones
    ``check_caps`` sends (a rule added to CapRule must be added to both)."""
    assert [f.name for f in dataclasses.fields(CapRule)] == ["max", "per_ms", "scope"]
    assert (
        SmsOutcome.loads(
            SmsOutcome("d", "c", "u", "suppressed", 1, rule="global:1/4h").dumps()
        ).rule
        == "global:1/4h"
    )


def test_batch_reads_a_profiles_number_written_by_an_older_version(
    redis_client: redis.Redis,
) -> None:
    """``prepare_many`` looks up the keyword consent of the number the stored profile has now:
    from ``p`` when it was written with the profile, from the JSON when an older version
    (``o`` and ``v`` only) replaced the profile or stored it without ``p``."""
    store = RedisStore(redis_client, "old:")
    redis_client.delete(*redis_client.keys("old:*") or ["-"])
    key = "old:{u-ana}:contact"
    store.put_contact("u-ana", ANA.to_record(), 1)
    assert redis_client.hget(key, "p") == b"1|+14155550100"
    moved = dataclasses.replace(ANA, phone="+14155550199")
    store.set_phone_consent("+14155550199", "opted_out", NOW - 1, "sms:STOP")
    policy = _policy(store, event_clock=False)

    def consent(did: str) -> str | None:
        [(_prior, reads)] = store.prepare_many([(_decision(did), policy.token())])
        return reads.contact.consent if reads.contact is not None else None

    assert consent("v1") == "opted_in"
    # an older version stores the new number: o and v change, p (the old number) stays
    redis_client.hset(key, mapping={"o": 2, "v": json.dumps(moved.to_record())})
    assert consent("v2") == "opted_out"
    redis_client.hdel(key, "p")  # stored before p existed
    assert consent("v3") == "opted_out"
    store.put_contact("u-ana", moved.to_record(), 3)  # re-materialized: p again
    assert redis_client.hget(key, "p") == b"3|+14155550199"
    assert consent("v4") == "opted_out"
    store.put_contact("u-ana", ANA.to_record(), 4)
    assert consent("v5") == "opted_in"
    assert store.set_consent("u-ana", "opted_out", NOW, "sms:STOP") is not None  # swap: p kept
    assert redis_client.hget(key, "p") == b"4|+14155550100"
    assert consent("v6") == "opted_out"
