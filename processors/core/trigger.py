"""Per-campaign trigger state machines: absence, repeat and event.

Each machine is configuration only; its per-user state is a small JSON-ready dict owned by the
engine (so it can live in a Faust table, a dict in a backtest, or be copied cheaply). The engine
calls, in event-time order:

* ``fire_due(state, before)`` — fire every timer whose deadline is strictly before ``before``
  (a timer at ``d`` fires once time has moved past ``d``; an event at exactly ``d`` still counts);
* ``on_event(state, event, gap_ms)`` — apply one event; returns immediate fires and the ids of
  already-fired decisions that this event cancels (a purchase after the cart text was decided).

Where the cart timer lives: ``AbsenceMachine`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from processors.core.campaign import (
    AbsenceTrigger,
    Campaign,
    EventTrigger,
    RepeatTrigger,
    Trigger,
)
from processors.core.events import ClickEvent, EventError, parse_ts

# How long after a decision a cancel event still produces a DecisionCancelled (the dispatcher may
# hold the send that long: quiet-hours deferral is capped at max_defer, default 12 h).
CANCEL_WINDOW_MS = 24 * 3_600_000
MAX_FIRED = 64  # firings per user and campaign remembered for cancellation (the most recent)
MAX_TRIGGER_IDS = 10  # trigger_event_ids kept per decision: the first and the most recent
MAX_GROUPS = 64  # repeat: distinct group_by values tracked per user and campaign

State = dict[str, Any]


@dataclass(slots=True)
class Fire:
    """A trigger firing; the engine turns it into a ``Decision``."""

    key_event_id: str  # the episode's first event id, or the firing event id
    fire_at: int
    trigger_ts: int
    event_ids: list[str]
    properties: dict[str, str]
    gap_ms: int | None = None  # inactivity before the triggering event (journey stage)
    immediate: bool = False  # decided by an event at its own ts (not by a timer)
    extra: dict[str, str] = field(default_factory=dict)


def _matches(where: dict[str, str], event: ClickEvent) -> bool:
    if not where:  # most triggers have no ``where``
        return True
    props = event.properties
    for k, v in where.items():
        if props.get(k) != v:
            return False
    return True


def _keep_ids(ids: list[str], new: str) -> list[str]:
    ids.append(new)
    if len(ids) > MAX_TRIGGER_IDS:
        del ids[1]  # keep the first (it names the episode) and the most recent ones
    return ids


def _fired(state: State) -> list[list[Any]]:
    """The firings a later cancel event may still cancel: ``state["last"]``, a list of
    ``[key_event_id, fire_at]`` (older states hold one such pair; read as a list of one)."""
    last = state.get("last")
    if not last:
        return []
    if isinstance(last[0], str):  # the single-pair format of older states
        return [list(last)]
    return last  # type: ignore[no-any-return]


def note_fired(state: State, key: str, fire_at: int) -> None:
    """Remember a firing for :func:`_cancel_fired`; firings out of the cancel window of this
    one, and all but the :data:`MAX_FIRED` most recent, are forgotten."""
    fired = [f for f in _fired(state) if f[1] + CANCEL_WINDOW_MS >= fire_at]
    fired.append([key, fire_at])
    if len(fired) > MAX_FIRED:
        del fired[: len(fired) - MAX_FIRED]
    state["last"] = fired


def last_fire_at(state: State) -> int | None:
    """``fire_at`` of the latest remembered firing, if any."""
    fired = _fired(state)
    return max(f[1] for f in fired) if fired else None


def _cancel_fired(state: State, event: ClickEvent) -> list[str]:
    """A cancel event after decisions fired: the keys of every one it cancels (fired before it,
    within the cancel window), each once. The dispatcher drops those it still holds."""
    fired = _fired(state)
    if not fired:
        return []
    ts = event.ts
    cancelled = [f[0] for f in fired if f[1] < ts <= f[1] + CANCEL_WINDOW_MS]
    if cancelled or any(f[1] + CANCEL_WINDOW_MS < ts for f in fired):
        keep = [f for f in fired if f[1] >= ts]  # not yet due at this event: cancelled later
        state["last"] = keep or None
    return cancelled


def _next_pending(st: State) -> int | None:
    pending = st.get("p")
    return min(p[0] for p in pending) if pending else None


def _fire_pending(st: State, before: int) -> list[Fire]:
    """Delayed firings ``[[fire_at, key, ts, ids, props, gap], ...]`` due before ``before``."""
    pending = st.get("p")
    if not pending:
        return []
    due = sorted((p for p in pending if p[0] < before), key=lambda p: p[0])
    if due:
        st["p"] = [p for p in pending if p[0] >= before]
    return [Fire(p[1], p[0], p[2], p[3], p[4], p[5]) for p in due]


class AbsenceMachine:
    """A ``start`` event not followed by a ``cancel`` event within ``after``: the cart timer.

    State: ``ep`` = open episode ``[first_id, first_ts, deadline, ids, props, gap]`` or None;
    ``last`` = ``[[key_event_id, fire_at], ...]`` of recent firings (for late cancellations).
    """

    def __init__(self, trigger: AbsenceTrigger) -> None:
        self.t = trigger

    def next_deadline(self, st: State) -> int | None:
        ep = st.get("ep")
        return ep[2] if ep else None

    def fire_due(self, st: State, before: int) -> list[Fire]:
        ep = st.get("ep")
        if not ep or ep[2] >= before:
            return []
        first_id, first_ts, deadline, ids, props, gap = ep
        st["ep"] = None
        note_fired(st, first_id, deadline)
        return [Fire(first_id, deadline, first_ts, list(ids), dict(props), gap)]

    def on_event(
        self, st: State, ev: ClickEvent, gap_ms: int | None
    ) -> tuple[list[Fire], list[str]]:
        t = self.t
        cancelled: list[str] = []
        if ev.event_type in t.cancel:
            ep = st.get("ep")
            if ep and ev.ts <= ep[2]:
                st["ep"] = None  # converted inside the window: no text
            # …and a text already decided for an earlier episode is no longer wanted either.
            cancelled = _cancel_fired(st, ev)
        elif ev.event_type in t.start and _matches(t.where, ev):
            ep = st.get("ep")
            if ep:
                ep[2] = ev.ts + t.after_ms  # every further start restarts the timer
                _keep_ids(ep[3], ev.event_id)
                ep[4] = dict(ev.properties)  # render with the most recent cart
            else:
                st["ep"] = [
                    ev.event_id,
                    ev.ts,
                    ev.ts + t.after_ms,
                    [ev.event_id],
                    dict(ev.properties),
                    gap_ms,
                ]
        return [], cancelled


class RepeatMachine:
    """``count`` matching events with ts in ``[t - within, t]``, per ``group_by`` value.

    State: ``g`` = {group: [[ts, id], ...]} (the most recent ``count`` only: enough to know if
    ``count`` fall in the window); ``lf`` = {group: ts of the last firing} (cooldown);
    ``p`` = delayed firings not yet due ``[[fire_at, key, ts, ids, props, gap], ...]``.
    """

    def __init__(self, trigger: RepeatTrigger) -> None:
        self.t = trigger

    def next_deadline(self, st: State) -> int | None:
        return _next_pending(st)

    def fire_due(self, st: State, before: int) -> list[Fire]:
        return _fire_pending(st, before)

    def on_event(
        self, st: State, ev: ClickEvent, gap_ms: int | None
    ) -> tuple[list[Fire], list[str]]:
        t = self.t
        if ev.event_type != t.event or not _matches(t.where, ev):
            return [], []
        if t.group_by is not None:
            group = ev.properties.get(t.group_by)
            if group is None:
                return [], []  # events lacking the group property are ignored
        else:
            group = ""
        groups: dict[str, list[list[Any]]] = st.setdefault("g", {})
        last_fire: dict[str, int] = st.setdefault("lf", {})
        horizon = ev.ts - t.within_ms
        seen = [x for x in groups.get(group, ()) if x[0] >= horizon]
        seen.append([ev.ts, ev.event_id])
        if len(seen) > t.count:
            del seen[: len(seen) - t.count]
        groups[group] = seen
        self._prune(groups, last_fire, ev.ts, keep=group)
        if len(seen) < t.count:
            return [], []
        previous = last_fire.get(group)
        if previous is not None and ev.ts - previous < t.cooldown_ms:
            return [], []
        last_fire[group] = ev.ts
        fire = Fire(
            key_event_id=ev.event_id,
            fire_at=ev.ts + t.delay_ms,
            trigger_ts=ev.ts,
            event_ids=[x[1] for x in seen],
            properties=dict(ev.properties),
            gap_ms=gap_ms,
            immediate=t.delay_ms == 0,
        )
        if t.delay_ms:
            st.setdefault("p", []).append(
                [fire.fire_at, fire.key_event_id, ev.ts, fire.event_ids, fire.properties, gap_ms]
            )
            return [], []
        return [fire], []

    def _prune(
        self, groups: dict[str, list[Any]], last_fire: dict[str, int], now: int, keep: str
    ) -> None:
        """Forget groups whose window and cooldown have both passed (bounded state)."""
        t = self.t
        stale = [
            g
            for g, xs in groups.items()
            if g != keep
            and (not xs or xs[-1][0] < now - t.within_ms)
            and (g not in last_fire or last_fire[g] <= now - t.cooldown_ms)
        ]
        for g in stale:
            groups.pop(g, None)
            last_fire.pop(g, None)
        for g in [
            g for g, ts in last_fire.items() if g not in groups and ts <= now - t.cooldown_ms
        ]:
            last_fire.pop(g)
        if len(groups) > MAX_GROUPS:
            oldest = sorted(groups, key=lambda g: groups[g][-1][0] if groups[g] else 0)
            for g in oldest[: len(groups) - MAX_GROUPS]:
                if g != keep:
                    groups.pop(g, None)


class EventMachine:
    """Each matching event fires at ``ts + delay`` (or ``before`` a time held in a property),
    unless a ``cancel`` event arrives in ``(ts, fire_at]``.

    State: ``p`` = pending ``[[fire_at, key, ts, ids, props, gap], ...]``; ``lf`` = ts of the
    last scheduled firing (cooldown); ``last`` = ``[[key, fire_at], ...]`` of recent firings.
    """

    def __init__(self, trigger: EventTrigger) -> None:
        self.t = trigger

    def next_deadline(self, st: State) -> int | None:
        return _next_pending(st)

    def fire_due(self, st: State, before: int) -> list[Fire]:
        fires = _fire_pending(st, before)
        for fire in fires:
            note_fired(st, fire.key_event_id, fire.fire_at)
        return fires

    def fire_at_for(self, ev: ClickEvent) -> int | None:
        """When this event's text is due, or None when it should not fire (time already past)."""
        t = self.t
        if t.wait_until is None:
            return ev.ts + t.delay_ms
        raw = ev.properties.get(t.wait_until)
        if raw is None:
            return None
        try:
            target = parse_ts(raw)
        except EventError:
            return None
        if target <= ev.ts:
            return None  # the moment is already past: nothing to remind of
        return max(ev.ts, target - t.before_ms)

    def on_event(
        self, st: State, ev: ClickEvent, gap_ms: int | None
    ) -> tuple[list[Fire], list[str]]:
        t = self.t
        cancelled: list[str] = []
        if ev.event_type in t.cancel:
            pending = st.get("p")
            if pending:
                st["p"] = [p for p in pending if not (p[2] < ev.ts <= p[0])]
            cancelled = _cancel_fired(st, ev)
        if ev.event_type != t.event or not _matches(t.where, ev):
            return [], cancelled
        fire_at = self.fire_at_for(ev)
        if fire_at is None:
            return [], cancelled
        previous = st.get("lf")
        if t.cooldown_ms and previous is not None and ev.ts - previous < t.cooldown_ms:
            return [], cancelled
        st["lf"] = ev.ts
        if fire_at == ev.ts:
            note_fired(st, ev.event_id, fire_at)
            fire = Fire(ev.event_id, fire_at, ev.ts, [ev.event_id], dict(ev.properties), gap_ms)
            fire.immediate = True
            return [fire], cancelled
        st.setdefault("p", []).append(
            [fire_at, ev.event_id, ev.ts, [ev.event_id], dict(ev.properties), gap_ms]
        )
        return [], cancelled


Machine = AbsenceMachine | RepeatMachine | EventMachine


def machine_for(campaign: Campaign, trigger: Trigger | None = None) -> Machine:
    """The state machine of a campaign's trigger (or of a variant's overriding trigger)."""
    t = trigger or campaign.trigger
    if isinstance(t, AbsenceTrigger):
        return AbsenceMachine(t)
    if isinstance(t, RepeatTrigger):
        return RepeatMachine(t)
    return EventMachine(t)
