"""The send policy against a small reference model (hypothesis stateful testing).

Random sequences of decisions (immediate, and timer decisions made a while after their
``fire_at``), conversions (exits), STOP/START, contact changes (time zone), clock moves that
release held sends, quiet-hours deferrals and drops, cap windows, dispatcher restarts (also one
in the middle of a gateway call) and duplicate deliveries of the same record run through
:class:`processors.core.policy.Policy` over the Redis store (a real redis-server) and over the
in-memory store, played as the live dispatcher does (wall clock; the gateway accepts every text;
published outcomes are marked emitted). After every step both stores must give exactly the
outcomes and texts the model predicts, and the texts must keep the invariants: one final outcome
per decision; no text after an exit, after STOP, inside quiet hours, beyond a cap or past
``max_defer``; no decision id sent twice.

``make test`` runs a small profile on a single Redis and on a local Redis Cluster; ``make chaos``
runs the long one (``chaos`` marker, single Redis).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from processors.core.campaign import parse_campaigns
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy import Policy, PolicyStore, Step
from processors.core.policy.memory import InMemoryStore
from processors.gateways.base import SendResult
from processors.redis import RedisStore
from processors.redis.client import connect

S, M, H = 1_000, 60_000, 3_600_000
T0 = int(datetime.fromisoformat("2024-03-13T20:00:00+00:00").timestamp() * 1000)
USERS = ("u1", "u2")
ZONES = ("UTC", "Asia/Tokyo")

# The model's copy of the campaign file below (the model does not read the policy's parse).
QUIET = {"cart": (18 * 60, 8 * 60, "defer"), "news": (12 * 60, 14 * 60, "drop")}
MAX_DEFER = {"cart": 13 * H, "news": 12 * H}
GLOBAL_CAP = (3, 3 * H)  # max texts per user in any rolling 3 h
CAMPAIGN_CAP = {"news": (1, H)}
CAMPAIGNS = parse_campaigns(
    {
        "caps": [{"max": 3, "per": "3h"}],
        "quiet_hours": {"from": "18:00", "to": "08:00", "action": "defer"},
        "campaigns": [
            {"id": "cart", "max_defer": "13h",
             "trigger": {"type": "absence", "start": ["add_to_cart"], "cancel": ["purchase"],
                         "after": "30m"},
             "message": {"template": "Your cart is waiting", "footer": None}},
            {"id": "news", "caps": [{"max": 1, "per": "1h"}],
             "quiet_hours": {"from": "12:00", "to": "14:00", "action": "drop"},
             "trigger": {"type": "event", "event": "signup"},
             "message": {"template": "Welcome", "footer": None}},
        ],
    }
)  # fmt: skip


def phone(user: str) -> str:
    return f"+4479111234{USERS.index(user):02d}"


# --------------------------------------------------------------------------- the model


def quiet_end(campaign: str, zone: str, now: int) -> int | None:
    """End of the campaign's quiet hours in ``zone`` if ``now`` is inside them (whole minutes;
    both zones have no DST)."""
    start, end, _action = QUIET[campaign]
    local = datetime.fromtimestamp(now // 1000, ZoneInfo(zone))
    minute = local.hour * 60 + local.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    day = local.date() + timedelta(days=1 if start > end and minute >= start else 0)
    at = datetime(day.year, day.month, day.day, end // 60, end % 60, tzinfo=ZoneInfo(zone))
    return int(at.timestamp() * 1000)


@dataclass
class Model:
    """What the policy must do, written from the rules, not from the policy's code."""

    consent: dict[str, str] = field(default_factory=lambda: dict.fromkeys(USERS, "opted_in"))
    zone: dict[str, str] = field(default_factory=lambda: dict.fromkeys(USERS, "UTC"))
    exits: dict[str, str] = field(default_factory=dict)  # decision id -> reason
    held: dict[str, tuple[Decision, int]] = field(default_factory=dict)  # id -> (d, due)
    final: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    texts: list[tuple[str, str, str, int]] = field(default_factory=list)  # did, user, cid, at

    def _capped(self, d: Decision, now: int) -> bool:
        mine = [t for t in self.texts if t[1] == d.user_id]
        most, per = GLOBAL_CAP
        if sum(1 for t in mine if t[3] > now - per) >= most:
            return True
        if d.campaign_id in CAMPAIGN_CAP:
            most, per = CAMPAIGN_CAP[d.campaign_id]
            same = [t for t in mine if t[2] == d.campaign_id]
            return sum(1 for t in same if t[3] > now - per) >= most
        return False

    def evaluate(self, d: Decision, now: int) -> list[tuple[str, str | None, int | None]]:
        """Outcomes (status, reason, due_at) of evaluating ``d`` at ``now``; records them."""
        consent = self.consent[d.user_id]
        if consent != "opted_in":
            return self._end(d, "suppressed", consent)
        if d.decision_id in self.exits:
            return self._end(d, "cancelled", self.exits[d.decision_id])
        if now - d.fire_at > MAX_DEFER[d.campaign_id]:
            return self._end(d, "suppressed", "stale")
        until = quiet_end(d.campaign_id, self.zone[d.user_id], now)
        if self._capped(d, now):
            return self._end(d, "suppressed", "frequency_cap")
        if until is not None:
            if QUIET[d.campaign_id][2] == "drop":
                return self._end(d, "suppressed", "quiet_hours")
            if until - d.fire_at > MAX_DEFER[d.campaign_id]:
                return self._end(d, "suppressed", "stale")
            self.held[d.decision_id] = (d, until)
            return [("deferred", "quiet_hours", until)]
        self.texts.append((d.decision_id, d.user_id, d.campaign_id, now))
        return self._end(d, "sent", None)

    def _end(self, d: Decision, status: str, reason: str | None) -> list[Any]:
        self.final[d.decision_id] = (status, reason)
        return [(status, reason, None)]

    def decide(self, d: Decision, now: int) -> list[Any]:
        if d.decision_id in self.final or d.decision_id in self.held:
            return []  # a duplicate: already published
        return self.evaluate(d, now)

    def cancel(self, c: DecisionCancelled) -> list[Any]:
        self.exits[c.decision_id] = c.reason
        if c.decision_id in self.held:
            del self.held[c.decision_id]
            self.final[c.decision_id] = ("cancelled", c.reason)
            return [("cancelled", c.reason, None)]
        return []

    def release(self, now: int) -> list[Any]:
        due = sorted((t, did) for did, (_d, t) in self.held.items() if t <= now)
        out: list[Any] = []
        for t, did in due:
            d, _ = self.held.pop(did)
            out += self.evaluate(d, max(now, t))
        return out


# --------------------------------------------------------------------------- one dispatcher


@dataclass
class System:
    """The policy over one store, played as the live dispatcher plays it."""

    name: str
    store: PolicyStore
    contacts: dict[str, Contact]
    policy: Policy = field(init=False)
    offset: int = 0
    texts: list[tuple[str, str, str, int, int]] = field(default_factory=list)  # + seq
    finals: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    seq: int = 0  # the machine's operation number
    last: dict[str, str] = field(default_factory=dict)  # decision id -> last outcome status
    dues: dict[str, int] = field(default_factory=dict)  # held: decision id -> due_at

    def __post_init__(self) -> None:
        self.restart()
        for c in self.contacts.values():
            self.put(c)

    def restart(self) -> None:
        """A new dispatcher process on the same store."""
        self.policy = Policy(CAMPAIGNS, self.store, event_clock=False)

    def put(self, contact: Contact) -> None:
        self.contacts[contact.user_id] = contact
        if isinstance(self.store, RedisStore):
            self.offset += 1
            self.store.put_contact(contact.user_id, contact.to_record(), self.offset)
        else:
            assert isinstance(self.store, InMemoryStore)
            self.store.contacts[contact.user_id] = contact

    def play(self, step: Step, now: int, crash: bool = False) -> list[Any]:
        """Publish ``step``; perform its send (a crash: the call is made, its answer lost)."""
        outcomes = list(step.outcomes)
        assert step.retry_after_ms is None, f"{self.name}: busy with itself"
        plan = step.send
        if plan is not None:
            gate = self.policy.begin_call(plan)
            if gate is not None:
                outcomes += gate.outcomes
            else:
                d = plan.decision
                self.texts.append((d.decision_id, d.user_id, d.campaign_id, plan.now_ms, self.seq))
                if crash:
                    return self._published(outcomes)
                result = SendResult(f"m-{len(self.texts)}", None, None, None)
                outcomes += self.policy.complete(plan, result, now).outcomes
        return self._published(outcomes)

    def holds(self, decision_id: str) -> bool:
        """Whether the store still holds the decision as a deferred send."""
        if isinstance(self.store, RedisStore):
            deferred, _data, _lease = self.store.deferred_keys_of(decision_id)
            return self.store.r.zscore(deferred, decision_id) is not None
        assert isinstance(self.store, InMemoryStore)
        return decision_id in self.store.deferred

    def _published(self, outcomes: list[SmsOutcome]) -> list[Any]:
        for o in outcomes:
            self.store.mark_emitted(_decision_of(o), o.status)
            self.last[o.decision_id] = o.status
            if o.status == "deferred" and o.due_at is not None:
                self.dues[o.decision_id] = o.due_at
            else:
                self.dues.pop(o.decision_id, None)
            if o.final:
                self.finals.setdefault(o.decision_id, []).append((o.status, o.reason))
        return [(o.status, o.reason, o.due_at) for o in outcomes]


def _decision_of(o: SmsOutcome) -> Decision:
    return Decision(o.decision_id, o.campaign_id, o.user_id, o.at, (), o.at)


# --------------------------------------------------------------------------- the machine


class PolicyMachine(RuleBasedStateMachine):
    redis_url = ""

    decisions = Bundle("decisions")

    def __init__(self) -> None:
        super().__init__()
        self.client = connect(self.redis_url)
        self.client.flushdb()
        contacts = {u: Contact(u, phone(u), "opted_in", timezone="UTC") for u in USERS}
        store = RedisStore(self.client, call_lease_ms=0, emit_grace_ms=0)
        self.systems = [
            System("memory", InMemoryStore(), dict(contacts)),
            System("redis", store, dict(contacts)),
        ]
        self.model = Model()
        self.now = T0
        self.made = 0
        # what the invariants read, by operation number (``seq``): when each exit, STOP span
        # and time zone began, and each decision's fire_at
        self.seq = 0
        self.exits: dict[str, int] = {}
        self.stops: dict[str, list[tuple[int, int]]] = {u: [] for u in USERS}
        self.zones: dict[str, list[tuple[int, str]]] = {u: [(0, "UTC")] for u in USERS}
        self.fires: dict[str, int] = {}
        self.in_flight = ""  # a decision whose gateway call lost its answer in a crash

    def _next(self) -> None:
        self.seq += 1
        for s in self.systems:
            s.seq = self.seq

    def teardown(self) -> None:
        self.client.close()

    def _compare(self, what: str, got: list[list[Any]], expected: list[Any]) -> None:
        for system, outcomes in zip(self.systems, got, strict=True):
            self._check_invariants(system)
            assert outcomes == expected, f"{what} ({system.name}): {outcomes} != {expected}"

    # -- rules

    @rule(
        target=decisions,
        user=st.sampled_from(USERS),
        campaign=st.sampled_from(["cart", "cart", "news"]),
        lag=st.sampled_from([0, 0, 30 * S, 10 * M, 90 * M]),
    )
    def decide(self, user: str, campaign: str, lag: int) -> Decision:
        """A new decision: immediate (lag 0) or a timer one, decided ``lag`` after ``fire_at``."""
        self._next()
        self.made += 1
        at = self.now - lag
        d = Decision(f"d{self.made}", campaign, user, at, (f"e{self.made}",), at)
        self.fires[d.decision_id] = at
        expected = self.model.decide(d, self.now)
        got = [s.play(s.policy.on_decision(d, self.now), self.now) for s in self.systems]
        self._compare("decide", got, expected)
        return d

    @rule(d=decisions)
    def redeliver(self, d: Decision) -> None:
        """The same decision record delivered again."""
        self._next()
        expected = self.model.decide(d, self.now)
        got = [s.play(s.policy.on_decision(d, self.now), self.now) for s in self.systems]
        self._compare("redeliver", got, expected)

    @rule(d=decisions, again=st.booleans())
    def convert(self, d: Decision, again: bool) -> None:
        """The customer converted: the exit for ``d`` (delivered twice when ``again``)."""
        self._next()
        self.exits.setdefault(d.decision_id, self.seq)
        c = DecisionCancelled(d.decision_id, d.campaign_id, d.user_id, "converted", self.now)
        for _ in range(2 if again else 1):
            expected = self.model.cancel(c)
            got = [s.play(s.policy.on_cancel(c, self.now), self.now) for s in self.systems]
            self._compare("convert", got, expected)

    @rule(user=st.sampled_from(USERS), stop=st.booleans())
    def consent(self, user: str, stop: bool) -> None:
        """STOP or START (a new profile record with that consent)."""
        self._next()
        status = "opted_out" if stop else "opted_in"
        if stop and self.model.consent[user] != "opted_out":
            self.stops[user].append((self.seq, 2**62))
        elif not stop and self.model.consent[user] == "opted_out":
            begun, _ = self.stops[user][-1]
            self.stops[user][-1] = (begun, self.seq)
        self.model.consent[user] = status
        for s in self.systems:
            s.put(replace(s.contacts[user], consent=status, consent_at_ms=self.now))

    @rule(user=st.sampled_from(USERS), zone=st.sampled_from(ZONES))
    def move(self, user: str, zone: str) -> None:
        """The contact's time zone changes."""
        self._next()
        self.zones[user].append((self.seq, zone))
        self.model.zone[user] = zone
        for s in self.systems:
            s.put(replace(s.contacts[user], timezone=zone))

    @rule(minutes=st.sampled_from([1, 20, 45, 90, 180, 420, 900]))
    def advance(self, minutes: int) -> None:
        """Wall-clock time passes; each held send is released when it comes due (the live
        dispatcher looks every 0.2 s), then at the new time."""
        self._next()
        target = self.now + minutes * M
        while True:
            dues = [t for _d, t in self.model.held.values()]
            dues += [t for system in self.systems for t in system.dues.values()]
            due = min((t for t in dues if t <= target), default=None)
            if due is None:
                break
            self._release(max(self.now, due))
        self._release(target)

    def _release(self, now: int) -> None:
        self.now = now
        expected = self.model.release(now)
        got = []
        for s in self.systems:
            outcomes: list[Any] = []
            for step in s.policy.release_due(now):
                outcomes += s.play(step, now)
            got.append(outcomes)
        self._compare("release", got, expected)

    @rule()
    def restart(self) -> None:
        for s in self.systems:
            s.restart()

    @rule(user=st.sampled_from(USERS))
    def crash_during_call(self, user: str) -> None:
        """A new immediate decision whose gateway call is made and whose process dies before it
        records the answer; the restarted dispatcher gets the decision again."""
        self._next()
        self.made += 1
        d = Decision(f"d{self.made}", "cart", user, self.now, (f"e{self.made}",), self.now)
        self.fires[d.decision_id] = d.fire_at
        expected = self.model.decide(d, self.now)
        got = [
            s.play(s.policy.on_decision(d, self.now), self.now, crash=True) for s in self.systems
        ]
        if expected[-1][0] == "sent":  # the call was made; its answer is lost
            expected = expected[:-1]
            self.model.final[d.decision_id] = ("failed", "unknown_after_crash")
            again: list[Any] = [("failed", "unknown_after_crash", None)]
        else:
            again = []
        self.in_flight = d.decision_id
        self._compare("crash", got, expected)
        self.in_flight = ""
        for s in self.systems:
            s.restart()
        got = [s.play(s.policy.on_decision(d, self.now), self.now) for s in self.systems]
        self._compare("after crash", got, again)

    # -- invariants over what was sent

    def _check_invariants(self, s: System) -> None:
        ids = [t[0] for t in s.texts]
        assert len(ids) == len(set(ids)), f"{s.name}: a decision id was sent twice"
        for did, finals in s.finals.items():
            assert len(finals) == 1, f"{s.name}: {did} has {len(finals)} final outcomes"
        for did in self.fires.keys() - {self.in_flight}:
            assert did in s.finals or (s.last.get(did) == "deferred" and s.holds(did)), (
                f"{s.name}: {did} has no final outcome and is not held"
            )
        for did, user, campaign, at, seq in s.texts:
            assert self.exits.get(did, seq) >= seq, f"{s.name}: text after an exit"
            assert not any(a <= seq < b for a, b in self.stops[user]), f"{s.name}: text after STOP"
            zone = [z for since, z in self.zones[user] if since <= seq][-1]
            assert quiet_end(campaign, zone, at) is None, f"{s.name}: text inside quiet hours"
            late = at - self.fires[did]
            assert late <= MAX_DEFER[campaign], f"{s.name}: text past max_defer"
        for user in USERS:
            for campaign, (most, per) in [(None, GLOBAL_CAP), *CAMPAIGN_CAP.items()]:
                times = sorted(t[3] for t in s.texts if t[1] == user and campaign in (None, t[2]))
                for i, at in enumerate(times):
                    window = [x for x in times[: i + 1] if x > at - per]
                    assert len(window) <= most, f"{s.name}: beyond a cap"

    @invariant()
    def stores_agree(self) -> None:
        memory, red = self.systems
        assert memory.texts == red.texts, "the stores disagree"
        assert memory.finals == red.finals, "the stores disagree"


# --------------------------------------------------------------------------- runs


def _run(url: str, examples: int, steps: int) -> None:
    PolicyMachine.redis_url = url
    run_state_machine_as_test(
        PolicyMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_policy_over_both_stores_equals_the_model(any_redis_url: str) -> None:
    """On a single Redis and on a Redis Cluster (the same machine, the same model)."""
    _run(any_redis_url, examples=60, steps=30)


@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_policy_over_both_stores_equals_the_model_long(single_redis_url: str) -> None:
    """~2 minutes on two cores (the ``make test`` profile takes ~10 s)."""
    _run(single_redis_url, examples=600, steps=50)
