"""Trigger semantics against hand-computed expectations (pure core, no broker)."""

from __future__ import annotations

from processors.core.campaign import parse_campaigns
from processors.core.decision import make_decision_id
from processors.core.engine import FLUSH_MS, Engine, UserState
from processors.core.events import ClickEvent

T0 = 1_710_325_412_000  # 2024-03-13T10:23:32Z
S, M, H = 1_000, 60_000, 3_600_000


def campaigns(*triggers: dict) -> object:
    return parse_campaigns(
        {
            "campaigns": [
                {"id": f"c{i}", "trigger": t, "message": {"template": "hi"}}
                for i, t in enumerate(triggers)
            ]
        }
    )


def ev(eid: str, etype: str, ts: int, user: str = "u1", **props: str) -> ClickEvent:
    return ClickEvent(eid, user, etype, ts, "s1", dict(props))


def run(engine: Engine, events: list[ClickEvent], flush: bool = True) -> tuple[dict, list, list]:
    """Feed events in arrival order; return (final decisions by id, emitted, cancellations)."""
    states: dict[str, UserState] = {}
    emitted, cancels, rejected = [], [], []
    for e in events:
        step = engine.on_event(states.get(e.user_id), e)
        if step.state is not None:
            states[e.user_id] = step.state
        emitted += step.decisions
        cancels += step.cancellations
        rejected += step.rejected
    if flush:
        for st in list(states.values()):
            step = engine.on_time(st, FLUSH_MS)
            emitted += step.decisions
            cancels += step.cancellations
    withdrawn = {c.decision_id for c in cancels if c.reason == "reordered"}
    final = {d.decision_id: d for d in emitted if d.decision_id not in withdrawn}
    return final, emitted, cancels + rejected


CART = {"type": "absence", "start": ["add_to_cart"], "cancel": ["purchase"], "after": "30m"}


def test_absence_fires_once_at_deadline_after_flush() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=30 * S)
    final, emitted, _ = run(eng, [ev("e1", "add_to_cart", T0)])
    assert len(emitted) == 1
    d = emitted[0]
    assert d.fire_at == T0 + 30 * M
    assert d.decision_id == make_decision_id("c0", "u1", "e1")
    assert d.trigger_event_ids == ("e1",)


def test_absence_not_emitted_before_watermark_passes_deadline_plus_lateness() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=30 * S)
    # A later event 30m+10s after: deadline passed, but not deadline + lateness.
    _, emitted, _ = run(
        eng, [ev("e1", "add_to_cart", T0), ev("e2", "page_view", T0 + 30 * M + 10 * S)], flush=False
    )
    assert emitted == []
    _, emitted, _ = run(
        eng, [ev("e1", "add_to_cart", T0), ev("e2", "page_view", T0 + 31 * M)], flush=False
    )
    assert [d.fire_at for d in emitted] == [T0 + 30 * M]


def test_absence_restart_moves_deadline_and_keeps_episode_id() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=0)
    final, _, _ = run(eng, [ev("e1", "add_to_cart", T0), ev("e2", "add_to_cart", T0 + 20 * M)])
    (d,) = final.values()
    assert d.fire_at == T0 + 50 * M
    assert d.decision_id == make_decision_id("c0", "u1", "e1")
    assert d.trigger_event_ids == ("e1", "e2")


def test_cancel_exactly_at_deadline_closes_without_firing() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=0)
    final, _, _ = run(eng, [ev("e1", "add_to_cart", T0), ev("e2", "purchase", T0 + 30 * M)])
    assert final == {}
    final, _, _ = run(eng, [ev("e1", "add_to_cart", T0), ev("e2", "purchase", T0 + 30 * M + 1)])
    assert len(final) == 1


def test_purchase_after_decision_emits_decision_cancelled() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=0)
    final, _, out = run(eng, [ev("e1", "add_to_cart", T0), ev("e2", "purchase", T0 + 40 * M)])
    (d,) = final.values()
    cancels = [c for c in out if getattr(c, "reason", None) == "converted"]
    assert [c.decision_id for c in cancels] == [d.decision_id]


def test_repeat_group_by_and_cooldown() -> None:
    trig = {"type": "repeat", "event": "product_view", "count": 3, "within": "1h",
            "group_by": "product_id", "cooldown": "24h"}  # fmt: skip
    eng = Engine(campaigns(trig), allowed_lateness_ms=0)
    events = [
        ev("a1", "product_view", T0, product_id="p1"),
        ev("b1", "product_view", T0 + 1 * M, product_id="p2"),
        ev("a2", "product_view", T0 + 2 * M, product_id="p1"),
        ev("x", "product_view", T0 + 3 * M),  # no product_id: ignored
        ev("a3", "product_view", T0 + 4 * M, product_id="p1"),  # 3rd p1 view: fires
        ev("a4", "product_view", T0 + 5 * M, product_id="p1"),  # cooldown
        ev("b2", "product_view", T0 + 70 * M, product_id="p2"),  # b1 fell out of the hour
        ev("b3", "product_view", T0 + 71 * M, product_id="p2"),
        ev("a5", "product_view", T0 + 25 * H, product_id="p1"),  # window: only 1 recent
    ]
    final, emitted, _ = run(eng, events)
    assert [d.trigger_event_ids[-1] for d in emitted] == ["a3"]
    assert emitted[0].fire_at == T0 + 4 * M
    # After the cooldown, three views in the hour fire again.
    more = events + [ev("a6", "product_view", T0 + 25 * H + M, product_id="p1"),
                     ev("a7", "product_view", T0 + 25 * H + 2 * M, product_id="p1")]  # fmt: skip
    final, emitted, _ = run(eng, more)
    assert [d.trigger_event_ids[-1] for d in emitted] == ["a3", "a7"]


def test_repeat_window_is_inclusive() -> None:
    trig = {"type": "repeat", "event": "v", "count": 2, "within": "1h"}
    eng = Engine(campaigns(trig), allowed_lateness_ms=0)
    final, _, _ = run(eng, [ev("1", "v", T0), ev("2", "v", T0 + H)])
    assert len(final) == 1
    final, _, _ = run(eng, [ev("1", "v", T0), ev("2", "v", T0 + H + 1)])
    assert final == {}


def test_event_delay_cancel_window_and_wait_until() -> None:
    trig = {"type": "event", "event": "signup", "delay": "10m", "cancel": ["unsub"]}
    eng = Engine(campaigns(trig), allowed_lateness_ms=0)
    final, _, _ = run(eng, [ev("1", "signup", T0), ev("2", "unsub", T0 + 10 * M)])
    assert final == {}  # cancel in (t, fire_at]
    final, _, _ = run(eng, [ev("1", "signup", T0), ev("2", "unsub", T0)])
    assert len(final) == 1  # same instant is not after t
    remind = {"type": "event", "event": "signup", "wait_until": "starts", "before": "24h"}
    eng = Engine(campaigns(remind), allowed_lateness_ms=0)
    final, _, _ = run(eng, [ev("1", "signup", T0, starts="2024-03-20T18:00:00Z")])
    (d,) = final.values()
    assert d.fire_at == 1_710_957_600_000 - 24 * H


def test_where_condition_and_cooldown_on_event_trigger() -> None:
    trig = {"type": "event", "event": "points_earned", "where": {"tier": "gold"}, "cooldown": "24h"}
    eng = Engine(campaigns(trig), allowed_lateness_ms=0)
    final, emitted, _ = run(eng, [
        ev("1", "points_earned", T0, tier="silver"),
        ev("2", "points_earned", T0 + M, tier="gold"),
        ev("3", "points_earned", T0 + 2 * M, tier="gold"),
        ev("4", "points_earned", T0 + 25 * H, tier="gold"),
    ])  # fmt: skip
    assert [d.trigger_event_ids for d in emitted] == [("2",), ("4",)]
    assert emitted[0].fire_at == T0 + M  # immediate: emitted at once, not at flush


def test_immediate_decision_is_emitted_before_commit() -> None:
    trig = {"type": "event", "event": "signup"}
    eng = Engine(campaigns(trig), allowed_lateness_ms=30 * S)
    step = eng.on_event(None, ev("1", "signup", T0))
    assert len(step.decisions) == 1


def test_duplicates_ignored_and_late_events_rejected() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=30 * S)
    events = [
        ev("e1", "add_to_cart", T0),
        ev("e1", "add_to_cart", T0),  # redelivery
        ev("e2", "page_view", T0 + 10 * M),
        ev("e3", "purchase", T0 + 10 * M - 31 * S),  # later than the allowed 30 s: late
    ]
    final, _, out = run(eng, events)
    reasons = [r for _, r in (x for x in out if isinstance(x, tuple))]
    assert reasons == ["duplicate", "late"]
    assert len(final) == 1  # the late purchase does not cancel


def test_out_of_order_within_lateness_equals_sorted() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=60 * S)
    # purchase (ts = deadline) arrives after an event past the deadline but within lateness.
    events = [ev("e1", "add_to_cart", T0), ev("e2", "page_view", T0 + 30 * M + 30 * S),
              ev("e3", "purchase", T0 + 30 * M)]  # fmt: skip
    final, _, _ = run(eng, events)
    assert final == {}


def test_reordering_withdraws_a_speculative_immediate_decision() -> None:
    trig = {"type": "event", "event": "pts", "cooldown": "1h"}
    eng = Engine(campaigns(trig), allowed_lateness_ms=5 * M)
    # Sorted: pts@0 fires, pts@2m is in cooldown. Arrival: 2m first, then 0.
    final, emitted, out = run(eng, [ev("b", "pts", T0 + 2 * M), ev("a", "pts", T0)])
    assert [d.trigger_event_ids for d in final.values()] == [("a",)]
    withdrawn = [c for c in out if getattr(c, "reason", None) == "reordered"]
    assert [c.decision_id for c in withdrawn] == [make_decision_id("c0", "u1", "b")]


def test_state_survives_serialisation() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=0)
    st = eng.on_event(None, ev("e1", "add_to_cart", T0)).state
    assert st is not None
    st2 = UserState.from_bytes(st.to_bytes())
    step = eng.on_time(st2, FLUSH_MS)
    assert [d.fire_at for d in step.decisions] == [T0 + 30 * M]


def test_audience_stage_at_fire_time() -> None:
    doc = {"campaigns": [{"id": "c", "trigger": CART, "message": {"template": "x"},
                          "audience": {"stage": "first_time_buyer"}}]}  # fmt: skip
    eng = Engine(parse_campaigns(doc), allowed_lateness_ms=0)
    final, _, _ = run(eng, [ev("e1", "add_to_cart", T0)])
    assert final == {}  # a prospect
    final, _, _ = run(eng, [ev("p", "purchase", T0 - H), ev("e1", "add_to_cart", T0)])
    (d,) = final.values()
    assert d.stage == "first_time_buyer"


def test_journey_facts_count_purchases_and_recent_activity() -> None:
    from processors.core import segment

    facts = segment.new_facts()
    for i, (etype, ts) in enumerate(
        [("page_view", T0), ("purchase", T0 + H), ("add_to_cart", T0 + 2 * H)]
    ):
        segment.observe(facts, ev(str(i), etype, ts))
    assert segment.events_last_24h(facts, T0 + 2 * H) == 3
    assert segment.lifecycle_stage(facts) == "first_time_buyer"
    gap = segment.observe(facts, ev("3", "purchase", T0 + 30 * H))
    assert gap == 28 * H
    assert facts.purchases == 2 and facts.last_purchase == T0 + 30 * H
    assert segment.lifecycle_stage(facts) == "repeat_customer"
    assert segment.events_last_24h(facts, T0 + 30 * H) == 1  # the others are > 24 h old


def test_idle_user_state_expires_after_ttl_on_a_live_tick() -> None:
    eng = Engine(campaigns(CART), allowed_lateness_ms=0, state_ttl_ms=2 * H)
    st = eng.on_event(None, ev("e1", "page_view", T0)).state
    assert st is not None
    step = eng.on_event(st, ev("e2", "page_view", T0 + M))
    # The tail (a page view no campaign reads) need not be committed on its own: the user wakes
    # at the end of the TTL, commits it and is forgotten in the same call.
    assert step.wake_at == T0 + M + 2 * H + 1
    assert eng.on_time(step.state, T0 + M + 2 * H).state is not None  # not yet
    assert eng.on_time(step.state, T0 + M + 2 * H + 1).state is None  # forgotten
    # The eager reference wakes for the commit first, then at the end of the TTL.
    eager = Engine(campaigns(CART), allowed_lateness_ms=0, state_ttl_ms=2 * H, lazy_commit=False)
    st = eager.on_event(None, ev("e1", "page_view", T0)).state
    step = eager.on_event(st, ev("e2", "page_view", T0 + M))
    assert step.wake_at == T0 + M + 1  # the newest event still waits for the watermark
    step = eager.on_time(step.state, T0 + M + H)
    assert step.state is not None
    assert step.wake_at == T0 + M + 2 * H + 1  # nothing pending: wake at the end of the TTL
    assert eager.on_time(step.state, T0 + M + 2 * H + 1).state is None  # forgotten
    # a user with an open cart is never forgotten while the timer is pending
    st = eng.on_event(None, ev("c1", "add_to_cart", T0)).state
    step = eng.on_time(st, T0 + 10 * M)
    assert step.state is not None and step.wake_at == T0 + 30 * M + 1
    assert eng.on_time(st, FLUSH_MS).state is not None  # end of input keeps the facts
