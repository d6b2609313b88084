"""Committing a quiet tail by taking the head (``UserState.quiet``) answers as replaying it.

The engine with ``reuse_head`` and the reference that replays every committed tail event
(``reuse_head=False``) get the same random calls: events in and out of order, redeliveries, late
events, live ticks (``on_time`` for the users due, the tick watermark passed to ``on_event``) or
the event clock, a flush at the end, and now and then a state reloaded from its bytes (which
forgets ``quiet``). Every step must give the same decisions, cancellations, rejections, filters
and wake-up, and the same state bytes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.core.engine import FLUSH_MS, Engine, Step, UserState
from processors.core.events import ClickEvent
from tests.unit.core.test_engine_live import CSET, LATENESS, T0, TTL, M, S


def _answer(step: Step) -> tuple[Any, ...]:
    state = None if step.state is None else step.state.to_bytes()
    rejected = [(e.event_id, why) for e, why in step.rejected]
    return step.decisions, step.cancellations, rejected, step.filtered, step.wake_at, state


@st.composite
def schedules(draw: st.DrawFn) -> tuple[bool, list[tuple[str, Any]]]:
    live = draw(st.booleans())
    wall = T0
    next_tick = T0 + M
    schedule: list[tuple[str, Any]] = []
    sent: list[ClickEvent] = []
    for i in range(draw(st.integers(1, 40))):
        wall += draw(st.sampled_from([0, S, 20 * S, M, 3 * M, 7 * M, 20 * M, 45 * M]))
        while live and next_tick <= wall:
            schedule.append(("tick", next_tick - LATENESS))
            next_tick += draw(st.sampled_from([M, 2 * M]))
        if sent and draw(st.integers(0, 9)) == 0:
            schedule.append(("event", sent[draw(st.integers(0, len(sent) - 1))]))
        if draw(st.integers(0, 6)) == 0:
            schedule.append(("reload", None))
        delay = draw(st.sampled_from([0, 0, 0, S, 30 * S, 2 * M, 6 * M, 12 * M, -M]))
        etype = draw(st.sampled_from(["a", "b", "c", "v", "s", "w", "q", "purchase", "x", "x"]))
        props = {"p": draw(st.sampled_from(["1", "2"]))} if draw(st.booleans()) else {}
        user = draw(st.sampled_from(["u1", "u2"]))
        e = ClickEvent(f"e{i}", user, etype, wall - delay, f"s{i // 5}", props)
        sent.append(e)
        schedule.append(("event", e))
    if live:
        schedule.append(("tick", next_tick + draw(st.sampled_from([0, 10 * M, TTL]))))
    return live, schedule


def _play(
    engine: Engine, live: bool, schedule: list[tuple[str, Any]], rebuild: bool = False
) -> list[Any]:
    """``rebuild``: every state is decoded from its bytes before each call, so no object is
    shared between calls or between a state's cores."""
    states: dict[str, UserState] = {}
    wake: dict[str, int] = {}
    tick_wm: int | None = None
    answers: list[Any] = []

    def keep(user: str, step: Step) -> None:
        answers.append(_answer(step))
        if step.state is None:
            states.pop(user, None)
            wake.pop(user, None)
        else:
            states[user] = step.state
            if step.wake_at is None:
                wake.pop(user, None)
            else:
                wake[user] = step.wake_at

    def fresh(user: str) -> UserState | None:
        state = states.get(user)
        if rebuild and state is not None:
            state = states[user] = UserState.from_bytes(state.to_bytes())
        return state

    def held(user: str) -> UserState:
        state = fresh(user)
        assert state is not None
        return state

    for kind, item in schedule:
        if kind == "reload":
            states = {u: UserState.from_bytes(s.to_bytes()) for u, s in states.items()}
        elif kind == "tick":
            tick_wm = item
            for _due, user in sorted((w, u) for u, w in wake.items() if w <= item):
                keep(user, engine.on_time(held(user), item))
        else:
            keep(item.user_id, engine.on_event(fresh(item.user_id), item, tick_wm))
    for user in sorted(states):
        keep(user, engine.on_time(held(user), FLUSH_MS))
    return answers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.booleans())
def test_taking_the_head_answers_as_replaying_the_tail(
    drawn: tuple[bool, list[tuple[str, Any]]], lazy: bool
) -> None:
    live, schedule = drawn
    fast = Engine(CSET, allowed_lateness_ms=LATENESS, state_ttl_ms=TTL, lazy_commit=lazy)
    reference = Engine(
        CSET, allowed_lateness_ms=LATENESS, state_ttl_ms=TTL, lazy_commit=lazy, reuse_head=False
    )
    assert _play(fast, live, schedule) == _play(reference, live, schedule)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.booleans())
def test_cores_that_share_campaign_states_answer_as_independent_ones(
    drawn: tuple[bool, list[tuple[str, Any]]], lazy: bool
) -> None:
    """``Core.clone`` shares the campaign states until one core changes one (copy on write):
    the engine keeping its states between calls answers as the replaying reference whose states
    are all rebuilt from their bytes before every call."""
    live, schedule = drawn
    fast = Engine(CSET, allowed_lateness_ms=LATENESS, state_ttl_ms=TTL, lazy_commit=lazy)
    reference = Engine(
        CSET, allowed_lateness_ms=LATENESS, state_ttl_ms=TTL, lazy_commit=lazy, reuse_head=False
    )
    assert _play(fast, live, schedule) == _play(reference, live, schedule, rebuild=True)


def test_an_event_that_commits_the_tail_before_it_takes_the_head() -> None:
    """Event clock, events further apart than the lateness: each commits the one before by
    taking the head (no replay); the new head shares the campaign states until it changes one."""
    engine = Engine(CSET, allowed_lateness_ms=LATENESS, state_ttl_ms=TTL)
    st = engine.on_event(None, ClickEvent("e1", "u", "a", T0, None, {})).state
    assert st is not None and st.quiet and st.head is not None
    head = st.head
    cart = head.campaigns["cart"]
    engine.on_event(st, ClickEvent("e2", "u", "x", T0 + 6 * M, None, {}))
    assert st.committed is head and [e.event.event_id for e in st.tail] == ["e2"]
    assert st.head is not None and st.head.campaigns["cart"] is cart and cart.shared
    step = engine.on_event(st, ClickEvent("e3", "u", "b", T0 + 9 * M, None, {}))  # cancels
    assert step.decisions == [] and "cart" not in st.head.campaigns  # the episode closed
    assert st.committed.campaigns["cart"] is cart and cart.episode is not None
    flush = engine.on_time(st, FLUSH_MS)
    assert flush.decisions == [] and "cart" not in st.committed.campaigns


def test_a_quiet_tail_is_committed_without_replaying_it() -> None:
    """A tick committing a quiet tail: the committed core becomes the head object. A timer the
    head fires inside the tail (only the commit emits it) makes the commit replay the tail."""
    engine = Engine(CSET, allowed_lateness_ms=LATENESS, state_ttl_ms=TTL)
    st = engine.on_event(None, ClickEvent("e1", "u", "x", T0, None, {})).state
    assert st is not None and st.quiet
    head = st.head
    engine.on_time(st, T0 + M)
    assert st.committed is head and st.head is None and not st.tail
    engine.on_event(st, ClickEvent("e2", "u", "w", T0 + 10 * M, None, {}))  # "soon": +2m
    assert st.quiet
    inside = engine.on_event(st, ClickEvent("e3", "u", "x", T0 + 13 * M, None, {}))
    assert inside.decisions == [] and not st.quiet  # the head dropped the "soon" firing
    commit = engine.on_time(st, T0 + 20 * M)
    assert [(d.campaign_id, d.fire_at) for d in commit.decisions] == [("soon", T0 + 12 * M)]
