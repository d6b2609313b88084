"""No text after the customer converts: a conversion that comes while the text is held (quiet
hours) cancels it, in a replay (event clock) and live, with the public example campaigns and
contacts (``examples/``).

The scene: Ana (Los Angeles) leaves her cart at 20:35 local; ``cart-recovery`` fires at 21:05,
inside quiet hours, and the text is deferred to 09:00 local. She buys at 21:30 (replay) or just
before 09:00 (live), and does nothing after that. Ben (New York) shops the next day, so the
replay's time passes 09:00 Los Angeles while nothing moves Ana's own time again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from processors.commands.contacts import import_contacts, read_contacts
from processors.core.campaign import CampaignSet, load_campaigns
from processors.core.clock import ManualClock
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.engine import FLUSH_MS, Engine, Step, UserState
from processors.core.events import ClickEvent
from processors.core.outcome import SmsOutcome
from processors.core.policy import Policy, PolicyStore
from processors.core.policy.memory import InMemoryStore
from processors.files import LineErrors
from processors.gateways.base import SendResult
from processors.redis import RedisStore
from processors.redis.client import connect
from processors.settings import REPO_ROOT, Settings
from tests.integration.test_dispatcher import Bus, Reader, running
from tests.support.own_redis import own_redis
from tests.support.redis_backends import cluster_url

EXAMPLES = REPO_ROOT / "examples"
CAMPAIGNS = EXAMPLES / "campaigns.yaml"
S, M, H = 1_000, 60_000, 3_600_000
LATENESS = 30 * S


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def ev(eid: str, user: str, etype: str, at: int, **props: str) -> ClickEvent:
    return ClickEvent(eid, user, etype, at, f"s-{user}", dict(props))


# 2024-03-13/14, Los Angeles on PDT (UTC-7), New York on EDT (UTC-4)
ANA_CART = ms("2024-03-14T03:35:00Z")  # 20:35 in Los Angeles
ANA_FIRE = ANA_CART + 30 * M  # 21:05: quiet hours (20:00-09:00)
ANA_DUE = ms("2024-03-14T16:00:00Z")  # 09:00 in Los Angeles: 10 h 55 min later (max_defer 12h)


def contacts() -> list[Contact]:
    return read_contacts(EXAMPLES / "contacts.jsonl", LineErrors("contacts"))


def replay_events() -> list[ClickEvent]:
    purchase = ANA_CART + 55 * M  # 21:30 in Los Angeles: Ana's last event
    return [
        ev("a1", "u-ana", "add_to_cart", ANA_CART, product_name="trail shoes"),
        ev("a2", "u-ana", "purchase", purchase),
        ev("b1", "u-ben", "add_to_cart", ms("2024-03-14T17:00:00Z"), product_name="bag"),
        ev("b2", "u-ben", "page_view", ms("2024-03-14T18:00:00Z")),
    ]


def engine_records(engine: Engine, events: list[ClickEvent]) -> list[Decision | DecisionCancelled]:
    """What the worker puts on the send topic, in its order (each step's decisions, then its
    cancellations), ending with the end-of-input flush."""
    states: dict[str, UserState] = {}
    out: list[Decision | DecisionCancelled] = []

    def take(user: str, step: Step) -> None:
        if step.state is None:
            states.pop(user, None)
        else:
            states[user] = step.state
        out.extend(step.decisions)
        out.extend(step.cancellations)

    for e in events:
        take(e.user_id, engine.on_event(states.get(e.user_id), e))
    for user in sorted(states):
        take(user, engine.on_time(states[user], FLUSH_MS))
    return out


# --------------------------------------------------------------------------- the engine


def test_conversion_exit_is_emitted_when_the_conversion_arrives() -> None:
    """The exit leaves the worker with the purchase (the event clock commits Ana's tail only at
    the end of input: her purchase is her last event)."""
    engine = Engine(load_campaigns(CAMPAIGNS), allowed_lateness_ms=LATENESS, lazy_commit=False)
    cart, purchase = replay_events()[:2]
    first = engine.on_event(None, cart)
    assert first.decisions == [] and first.cancellations == []
    step = engine.on_event(first.state, purchase)
    (decision,) = step.decisions  # the timer, committed by the purchase's watermark
    assert (decision.campaign_id, decision.fire_at) == ("cart-recovery", ANA_FIRE)
    assert [(c.decision_id, c.reason, c.at) for c in step.cancellations] == [
        (decision.decision_id, "converted", purchase.ts)
    ]
    assert step.state is not None
    flushed = engine.on_time(step.state, FLUSH_MS)  # the commit does not repeat the exit
    assert flushed.decisions == [] and flushed.cancellations == []


# --------------------------------------------------------------------------- replay (event clock)


@pytest.fixture
def replay_settings(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> Settings:
    replay = settings.model_copy(
        update={"clock": "event", "gateway": "outbox", "outbox_path": tmp_path / "outbox.jsonl"}
    )
    import_contacts(EXAMPLES / "contacts.jsonl", replay)
    return replay


def replay_through_dispatcher(
    settings: Settings, phases: list[tuple[int, list[Decision | DecisionCancelled]]]
) -> dict[str, SmsOutcome]:
    """The real dispatcher (event clock): each phase's records on its partition, in order, then
    a pause until each of its decisions has an outcome and the dispatcher's release loop (every
    0.2 s) has run a few times; then end of input. Returns the final outcome of each decision."""
    doc = yaml.safe_load(CAMPAIGNS.read_text())
    reader = Reader(settings, settings.topic_outcomes)
    try:
        with running(settings, doc):
            bus = Bus(settings)
            for partition, records in phases:
                bus.send(*records, partition=partition)
                ids = {r.decision_id for r in records if isinstance(r, Decision)}
                reader.poll_until(lambda ids=ids: ids <= {o.decision_id for o in reader.outcomes})
                time.sleep(1.0)
            bus.end_of_input()
            reader.poll_until(lambda: reader.flushes.all_complete())
        return {o.decision_id: o for o in reader.outcomes if o.final}
    finally:
        reader.close()


def test_replay_conversion_while_held_cancels_the_text(replay_settings: Settings) -> None:
    """Cause 1: the exit reached the dispatcher at the end of input, after Ben's decision had
    moved the replay's time past 09:00 in Los Angeles and released Ana's text."""
    engine = Engine(load_campaigns(CAMPAIGNS), allowed_lateness_ms=LATENESS, lazy_commit=False)
    records = engine_records(engine, replay_events())
    ana = next(r for r in records if isinstance(r, Decision) and r.user_id == "u-ana")
    final = replay_through_dispatcher(replay_settings, [(0, records)])
    assert (final[ana.decision_id].status, final[ana.decision_id].reason) == (
        "cancelled",
        "converted",
    )
    ben = next(r for r in records if isinstance(r, Decision) and r.user_id == "u-ben")
    assert final[ben.decision_id].status == "sent"  # the replay did reach Ben's morning
    texts = replay_settings.outbox_path.read_text().splitlines()
    assert len(texts) == 1 and "u-ana" not in texts[0]


def test_replay_release_waits_for_the_partition_of_the_held_text(
    replay_settings: Settings,
) -> None:
    """A send topic partition read ahead (Ben's, at 13:30 New York) does not release a text held
    for a user of another partition (Ana's) before every partition's time has reached its due
    time: her exit, behind her decision on her own partition and read a second later, still
    finds the text held."""
    engine = Engine(load_campaigns(CAMPAIGNS), allowed_lateness_ms=LATENESS, lazy_commit=False)
    records = engine_records(engine, replay_events())
    ben = [r for r in records if r.user_id == "u-ben"]
    ana = [r for r in records if r.user_id == "u-ana"]
    (ana_decision,) = [r for r in ana if isinstance(r, Decision)]
    (ana_exit,) = [r for r in ana if isinstance(r, DecisionCancelled)]
    final = replay_through_dispatcher(
        replay_settings, [(0, ben), (1, [ana_decision]), (1, [ana_exit])]
    )
    assert (final[ana_decision.decision_id].status, final[ana_decision.decision_id].reason) == (
        "cancelled",
        "converted",
    )
    assert [o.status for o in final.values()].count("sent") == 1  # Ben's


# --------------------------------------------------------------------------- live clock


@dataclass
class LiveRun:
    """The live system on a manual wall clock: the worker's engine with its tick watermark
    (ticks every 0.5 s, wall clock minus the lateness), the dispatcher's policy with the wall
    clock, deferred sends released when due, a gateway that accepts every text."""

    engine: Engine
    policy: Policy
    clock: ManualClock
    states: dict[str, UserState] = field(default_factory=dict)
    wakes: dict[str, int] = field(default_factory=dict)
    dues: set[int] = field(default_factory=set)
    tick_watermark: int | None = None
    outcomes: list[SmsOutcome] = field(default_factory=list)
    sent_at: dict[str, int] = field(default_factory=dict)

    def event(self, e: ClickEvent) -> None:
        """``e`` arrives at its own time (the next tick has not run yet)."""
        self.run_until(e.ts)
        self._worker(
            e.user_id, self.engine.on_event(self.states.get(e.user_id), e, self.tick_watermark)
        )

    def run_until(self, to: int) -> None:
        """Every tick up to ``to`` that has work (a user's wake-up or a deferred send due)."""
        while True:
            wanted = [w + LATENESS for w in self.wakes.values()] + list(self.dues)
            due = min((t for t in wanted if t <= to), default=None)
            if due is None:
                break
            self._tick(-(-due // 500) * 500)  # the next tick on the 0.5 s grid
        self.clock.advance_to(to)

    def _tick(self, now: int) -> None:
        self.clock.advance_to(now)
        watermark = now - LATENESS
        for user, wake in sorted(self.wakes.items()):
            if wake <= watermark:
                del self.wakes[user]
                self._worker(user, self.engine.on_time(self.states[user], watermark))
        self.tick_watermark = watermark
        self.dues = {t for t in self.dues if t > now}
        for step in self.policy.release_due(now):
            self._dispatch_step(step)

    def _worker(self, user: str, step: Step) -> None:
        if step.state is None:
            self.states.pop(user, None)
            self.wakes.pop(user, None)
        else:
            self.states[user] = step.state
            if step.wake_at is None:
                self.wakes.pop(user, None)
            else:
                self.wakes[user] = step.wake_at
        now = self.clock.now_ms()
        for d in step.decisions:
            self._dispatch_step(self.policy.on_decision(d, now))
        for c in step.cancellations:
            self._dispatch_step(self.policy.on_cancel(c, now))

    def _dispatch_step(self, step: Any) -> None:
        self.outcomes += step.outcomes
        self.dues |= {o.due_at for o in step.outcomes if o.status == "deferred" and o.due_at}
        plan = step.send
        if plan is None:
            return
        gate = self.policy.begin_call(plan)
        if gate is not None:
            self.outcomes += gate.outcomes
            return
        now = self.clock.now_ms()
        done = self.policy.complete(
            plan, SendResult(f"m-{len(self.sent_at)}", None, None, None), now
        )
        self.sent_at[plan.decision.decision_id] = now
        self.outcomes += done.outcomes


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def live_store(request: pytest.FixtureRequest) -> Iterator[PolicyStore]:
    if request.param == "memory":
        yield InMemoryStore(contacts={c.user_id: c for c in contacts()})
        return
    with contextlib.ExitStack() as stack:
        if request.param == "redis":
            url = stack.enter_context(own_redis())
        else:
            url = cluster_url(request.getfixturevalue("redis_cluster"))
        client = connect(url)
        stack.callback(client.close)
        client.flushdb()
        store = RedisStore(client)
        for offset, c in enumerate(contacts()):
            store.put_contact(c.user_id, c.to_record(), offset)
        yield store
        client.flushdb()


def test_live_conversion_while_held_cancels_the_text(live_store: PolicyStore) -> None:
    """Cause 2: live, exits came from committed state only, one allowed lateness after the
    purchase; Ana buys 15 s before her held text is due, and it went out at 09:00."""
    campaigns: CampaignSet = load_campaigns(CAMPAIGNS)
    clock = ManualClock(ANA_CART)
    engine = Engine(campaigns, allowed_lateness_ms=LATENESS, clock=clock, clock_name="live")
    live = LiveRun(engine, Policy(campaigns, live_store, event_clock=False), clock)
    live.event(ev("a1", "u-ana", "add_to_cart", ANA_CART, product_name="trail shoes"))
    live.run_until(ANA_FIRE + H)
    (deferred,) = [o for o in live.outcomes if o.status == "deferred"]
    assert (deferred.campaign_id, deferred.due_at) == ("cart-recovery", ANA_DUE)
    purchase = ANA_DUE - 15 * S
    live.event(ev("a2", "u-ana", "purchase", purchase))
    live.run_until(ANA_DUE + H)
    final = {o.decision_id: o for o in live.outcomes if o.final}
    assert (final[deferred.decision_id].status, final[deferred.decision_id].reason) == (
        "cancelled",
        "converted",
    )
    assert live.sent_at == {}
