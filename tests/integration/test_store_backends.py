"""The Redis store on a single Redis and on a Redis Cluster (3 masters + 3 replicas): the same
batches, deferred claims, STOP lookups and gateway budget give the same results on both. On a
cluster every script call must stay on one slot (redis-py refuses a call whose keys span slots;
Redis refuses a script that reaches a key of another node), so these tests fail on a cluster
for any store operation that mixes users, or a user with a global structure."""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left
from collections import deque

import pytest

from processors.core.campaign import parse_campaigns
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy import Final, Policy, Step
from processors.core.sms import SendResult
from processors.dispatcher.deciding import Decider
from processors.dispatcher.inbox import Item
from processors.redis import RedisStore
from processors.redis.client import Client, is_cluster
from processors.redis.rate_limit import RateLimiter
from processors.webhooks.inbound import apply_inbound

pytestmark = pytest.mark.integration

NOW = 1_710_331_200_000  # 2024-03-13 12:00 UTC: outside the default quiet hours
CAMPAIGNS = parse_campaigns(
    {
        "caps": [{"max": 1, "per": "1h"}],
        "campaigns": [
            {"id": "cart", "trigger": {"type": "event", "event": "signup"},
             "message": {"template": "Welcome", "footer": None}},
        ],
    }
)  # fmt: skip
USERS = [f"user-{i}" for i in range(70)]


def phone(i: int) -> str:
    return f"+44791100{i:04d}"


def put_contacts(store: RedisStore) -> None:
    for i, user in enumerate(USERS):
        contact = Contact(user, phone(i), "opted_in", timezone="UTC")
        store.put_contact(user, contact.to_record(), i + 1)
        store.index_phone(user, phone(i))


def decide(policy: Policy, store: RedisStore, decisions: list[Decision], room: int) -> list[Step]:
    """The live dispatcher's batch path (``Decider``: prepare_many, settle_many) for
    ``decisions``, at most ``room`` sends; each step's send goes out at once."""
    queue = deque(Item(((("decisions", 0)), n), "decision", d) for n, d in enumerate(decisions))
    steps: list[Step] = []
    sends = [0]

    def handle(step: Step, _item: Item) -> None:
        steps.append(step)
        if step.send is not None:
            sends[0] += 1
            gate = policy.begin_call(step.send)
            assert gate is None, gate.outcomes
            answer = SendResult(f"m-{step.send.decision.decision_id}", None, None, None)
            steps.append(policy.complete(step.send, answer, NOW))

    Decider(policy, store, event_clock=False).decide(
        queue, list(queue), lambda: room - sends[0], lambda _i: NOW, handle
    )
    return steps


def finals(steps: list[Step]) -> dict[str, tuple[str, str | None]]:
    return {o.decision_id: (o.status, o.reason) for s in steps for o in s.outcomes if o.final}


def test_a_batch_of_many_users_is_decided_as_one_at_a_time(any_redis: Client) -> None:
    """Three decisions each for 70 users (interleaved; two batches of up to 128, the second's
    reads sent with the first's settle), a STOP from one user's number: each user's first text
    goes out, the others are capped, in the same batch or a later one; the STOPped user gets
    none; a room of 25 sends stops after the 25th, the rest is decided by the next call;
    published outcomes are marked; a redelivery finds every decision done."""
    store = RedisStore(any_redis)
    put_contacts(store)
    assert store.set_phone_consent(phone(7), "opted_out", NOW - 1_000, "sms:keyword")
    policy = Policy(CAMPAIGNS, store)
    decisions = [
        Decision(f"d-{n}-{user}", "cart", user, NOW, (f"e-{n}-{user}",), NOW)
        for n in range(3)
        for user in USERS
    ]
    random.Random(3).shuffle(decisions)

    first = decide(policy, store, decisions, room=25)
    assert sum(1 for s in first if s.send is not None) == 25
    done = finals(first)
    rest = [d for d in decisions if d.decision_id not in done]
    assert len(rest) > 128  # the next call decides two batches, the second prepared in advance
    second = decide(policy, store, rest, room=1_000)
    got = {**done, **finals(second)}

    expected: dict[str, tuple[str, str | None]] = {}
    texted: set[str] = set()
    for d in decisions:  # in batch order: the first of a user's decisions is sent
        if d.user_id == USERS[7]:
            expected[d.decision_id] = ("suppressed", "opted_out")
        elif d.user_id in texted:
            expected[d.decision_id] = ("suppressed", "frequency_cap")
        else:
            expected[d.decision_id] = ("sent", None)
            texted.add(d.user_id)
    assert got == expected
    assert sum(1 for v in got.values() if v[0] == "sent") == len(USERS) - 1

    marks = [(d.user_id, d.decision_id, got[d.decision_id][0]) for d in decisions]
    store.mark_emitted_many(marks)
    again = [store.begin(d, "redelivery", resume_deferred=False) for d in decisions]
    assert {(p.state, p.emitted) for p in again} == {("done", True)}
    assert [p.outcome.status for p in again if p.outcome] == [m[2] for m in marks]


def test_deferred_sends_are_claimed_once_cancelled_and_released(any_redis: Client) -> None:
    """40 deferred sends of 40 users (30 due, 10 later): claims of 7 at a time hand out each due
    one exactly once; a cancelled one is never handed out; a finished claim leaves the index
    (finished alone or in a batch); a claim whose lease ends comes back unless its decision
    finished meanwhile (also when another instance finished it)."""
    store = RedisStore(any_redis, lease_ms=60_000)
    policy = Policy(CAMPAIGNS, store)
    held: dict[str, Decision] = {}
    for i in range(40):
        d = Decision(f"late-{i}", "cart", USERS[i], NOW, (f"e{i}",), NOW)
        token = policy.token()
        assert store.begin(d, token, resume_deferred=False).state == "new"
        due = NOW + (1_000 if i < 30 else 3_600_000)
        assert store.defer(d, due, _outcome(d, "deferred", "quiet_hours", due), token)
        held[d.decision_id] = d
    assert store.deferred_count() == 40
    cancel = DecisionCancelled("late-3", "cart", USERS[3], "purchase", NOW + 10)
    assert store.cancel(cancel, _outcome(held["late-3"], "cancelled", "purchase"))
    assert store.deferred_count() == 39

    claimed: list[str] = []
    while batch := store.claim_due(NOW + 2_000, 7):
        assert len(batch) <= 7
        claimed += [d.decision_id for d, _due in batch]
    assert sorted(claimed) == sorted(f"late-{i}" for i in range(30) if i != 3)
    assert store.claim_due(NOW + 2_000, 7) == []
    assert store.deferred_count() == 39  # 29 claimed (leased), 10 not yet due

    # finish one claim: it leaves the index
    d0 = held["late-0"]
    token = policy.token()
    assert store.begin(d0, token, resume_deferred=True).state == "deferred"
    assert store.finish(d0, _outcome(d0, "sent", None), True, token)
    assert store.deferred_count() == 38
    # ... or recorded by a batch's settle step
    d2, token = held["late-2"], policy.token()
    assert store.begin(d2, token, resume_deferred=True).state == "deferred"
    assert store.settle_many([Final(d2, token, _outcome(d2, "sent", None))]) == [(None, True)]
    assert store.deferred_count() == 37
    # another instance finishes one that this one claimed
    other = RedisStore(any_redis)
    d1, token = held["late-1"], policy.token()
    assert other.begin(d1, token, resume_deferred=True).state == "deferred"
    assert other.finish(d1, _outcome(d1, "sent", None), True, token)

    # the leases end (as after a crash of the claimer): the live claims come back to another
    # instance, the finished ones do not
    for _deferred, _data, lease in store.deferred_shards:
        leased = any_redis.zrange(lease, 0, -1)
        if leased:
            any_redis.zadd(lease, dict.fromkeys(leased, 0), xx=True)
    back = sorted(d.decision_id for d, _due in other.claim_due(NOW + 2_000, 1_000))
    assert back == sorted(f"late-{i}" for i in range(4, 30))
    assert store.deferred_count() == 36
    every = sorted(d.decision_id for d, _due in other.claim_due(None, 1_000))
    assert every == sorted(f"late-{i}" for i in range(30, 40))


def _outcome(d: Decision, status: str, reason: str | None, due: int | None = None) -> SmsOutcome:
    return SmsOutcome(
        d.decision_id, d.campaign_id, d.user_id, status, NOW, reason=reason, due_at=due
    )


def test_a_stop_reaches_every_profile_of_its_number(any_redis: Client) -> None:
    """Three profiles share a number, one moves to another number; a STOP from the number (the
    webhook's ``apply_inbound``) finds the two left and opts them out; a profile with that
    number that arrives after the STOP is opted out too (by the number's own record). Each is
    seen opted out when read, when prepared and by the last check before the gateway call; the
    profile that moved is not; a START from the number lets them all through again."""
    store = RedisStore(any_redis)
    shared, other = "+447911009999", "+447911008888"
    for n, user in enumerate(["a", "b", "c"]):
        store.put_contact(user, Contact(user, shared, "opted_in").to_record(), n + 1)
        store.index_phone(user, shared)
    store.put_contact("c", Contact("c", other, "opted_in").to_record(), 10)
    store.index_phone("c", other)
    assert store.users_for_phone(shared) == ["a", "b"]
    assert store.users_for_phone(other) == ["c"]

    stop = apply_inbound(store, "Stop", shared, NOW)
    assert (stop.kind, stop.user_ids) == ("stop", ["a", "b"])
    assert [c.user_id for c in stop.contacts] == ["a", "b"]
    store.put_contact("d", Contact("d", shared, "opted_in").to_record(), 11)  # after the STOP
    store.index_phone("d", shared)
    users = ["a", "b", "c", "d"]

    def checks() -> tuple[list[str], list[str], list[str]]:
        policy = Policy(CAMPAIGNS, store)
        decisions = [
            Decision(f"s-{u}-{policy.token()}", "cart", u, NOW, ("e",), NOW) for u in users
        ]
        tokens = [policy.token() for _ in decisions]
        prepared = store.prepare_many(list(zip(decisions, tokens, strict=True)))
        return (
            [store.contact(u).consent for u in users],  # type: ignore[union-attr]
            [p.contact.consent for _prior, p in prepared],  # type: ignore[union-attr]
            [store.start_call(d, t) for d, t in zip(decisions, tokens, strict=True)],
        )

    out = "opted_out"
    assert checks() == (
        [out, out, "opted_in", out],
        [out, out, "opted_in", out],
        ["cancelled:opted_out", "cancelled:opted_out", "ok", "cancelled:opted_out"],
    )
    assert apply_inbound(store, "START", shared, NOW + 1).user_ids == ["a", "b", "d"]
    assert checks() == (["opted_in"] * 4, ["opted_in"] * 4, ["ok"] * 4)


def test_sent_texts_and_links_are_found_by_their_ids(any_redis: Client) -> None:
    """What the webhooks look up: a sent text by its client-ref, a user's last campaign, a short
    link (first writer wins)."""
    store = RedisStore(any_redis)
    for i, user in enumerate(USERS[:20]):
        store.remember_send(Decision(f"t-{i}", "cart", user, NOW, ("e",), NOW), i % 3 + 1)
    refs = [store.sent_ref(f"t-{i}") for i in range(20)]
    assert [(r.user_id, r.segments) for r in refs if r] == [
        (user, i % 3 + 1) for i, user in enumerate(USERS[:20])
    ]
    assert store.last_campaign(USERS[5]) == "cart"
    assert store.put_link("abc", {"url": "https://a.example"}, 60_000) == {
        "url": "https://a.example"
    }
    assert store.put_link("abc", {"url": "https://b.example"}, 60_000) == {
        "url": "https://a.example"
    }
    assert store.link("abc") == {"url": "https://a.example"}


def busiest_window(times: list[float], width: float) -> int:
    """Most arrivals in any half-open window ``[t, t + width)``."""
    ts = sorted(times)
    return max((bisect_left(ts, t + width) - i for i, t in enumerate(ts)), default=0)


def test_two_rate_limiters_never_exceed_the_budget_together(any_redis: Client) -> None:
    """Two limiter instances on one key, four threads each, ~2 s at 15/s: no sliding second
    holds more than 15 arrivals; on a cluster both keys of the limiter share one slot."""
    rate, seconds = 15, 2.0
    limiters = [RateLimiter(any_redis, rate, key="test:rl") for _ in range(2)]
    if is_cluster(any_redis):
        assert any_redis.keyslot(limiters[0].key) == any_redis.keyslot(limiters[0].sent_key)
    arrivals: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(limiter: RateLimiter, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                limiter.acquire()
                time.sleep(rng.uniform(0.0, 0.02))
                with lock:
                    arrivals.append(time.time())
                limiter.done()
        except BaseException as exc:  # e.g. a script whose keys span slots
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(limiters[n % 2], n)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(arrivals) > rate  # more than one full window was exercised
    assert busiest_window(arrivals, 1.0) <= rate
