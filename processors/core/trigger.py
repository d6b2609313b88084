"""Per-campaign trigger state machines: absence, repeat and event.

Each machine is configuration only; its per-user state is a :class:`CampaignState` owned by the
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


@dataclass(slots=True, init=False)
class Episode:
    """An absence trigger's open episode: the first start event, the deadline, the most recent
    event ids (:data:`MAX_TRIGGER_IDS`), the properties of the most recent start event (never
    changed in place: replaced) and the inactivity gap before the first one."""

    first_id: str
    first_ts: int
    deadline: int
    ids: list[str]
    props: dict[str, str]
    gap: int | None

    def __init__(
        self,
        first_id: str,
        first_ts: int,
        deadline: int,
        ids: list[str],
        props: dict[str, str],
        gap: int | None,
    ) -> None:
        self.first_id = first_id
        self.first_ts = first_ts
        self.deadline = deadline
        self.ids = ids
        self.props = props
        self.gap = gap

    def clone(self) -> Episode:
        return Episode(self.first_id, self.first_ts, self.deadline, list(self.ids), self.props,
                       self.gap)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Pending:
    """A delayed firing not yet due (event and repeat triggers)."""

    fire_at: int
    key: str
    ts: int
    ids: list[str]
    props: dict[str, str]
    gap: int | None


@dataclass(frozen=True, slots=True)
class Fired:
    """A firing a later cancel event may still cancel."""

    key: str
    fire_at: int


@dataclass(frozen=True, slots=True)
class Sighting:
    """A repeat trigger's matching event."""

    ts: int
    event_id: str


@dataclass(slots=True, init=False)
class CampaignState:
    """One user's state for one campaign; each machine uses its own fields, the others stay empty.

    ``episode`` (absence): the open episode; ``fired`` (absence, event): recent firings, oldest
    first; ``groups`` and ``group_fired`` (repeat): the most recent ``count`` sightings and the
    last firing per ``group_by`` value; ``last_scheduled`` (event): ts of the last scheduled
    firing (cooldown); ``pending`` (event, repeat): delayed firings not yet due."""

    episode: Episode | None = None
    fired: list[Fired] = field(default_factory=list)
    groups: dict[str, list[Sighting]] = field(default_factory=dict)
    group_fired: dict[str, int] = field(default_factory=dict)
    last_scheduled: int | None = None
    pending: list[Pending] = field(default_factory=list)
    shared: bool = field(default=False, compare=False, repr=False)

    def __init__(
        self,
        episode: Episode | None = None,
        fired: list[Fired] | None = None,
        groups: dict[str, list[Sighting]] | None = None,
        group_fired: dict[str, int] | None = None,
        last_scheduled: int | None = None,
        pending: list[Pending] | None = None,
    ) -> None:
        self.episode = episode
        self.fired = [] if fired is None else fired
        self.groups = {} if groups is None else groups
        self.group_fired = {} if group_fired is None else group_fired
        self.last_scheduled = last_scheduled
        self.pending = [] if pending is None else pending
        self.shared = False

    def clone(self) -> CampaignState:
        """A copy sharing only immutable parts (not shared)."""
        ep = self.episode
        return CampaignState(
            None if ep is None else ep.clone(),
            list(self.fired),
            {g: list(xs) for g, xs in self.groups.items()} if self.groups else {},
            dict(self.group_fired) if self.group_fired else {},
            self.last_scheduled,
            list(self.pending),
        )

    def is_empty(self) -> bool:
        return (
            self.episode is None
            and not self.fired
            and not self.groups
            and not self.group_fired
            and self.last_scheduled is None
            and not self.pending
        )

    def next_deadline(self) -> int | None:
        """The earliest timer: the episode's deadline, or the first pending firing."""
        ep = self.episode
        if ep is not None:
            return ep.deadline
        pending = self.pending
        if not pending:
            return None
        first = pending[0].fire_at
        for p in pending:
            if p.fire_at < first:
                first = p.fire_at
        return first


@dataclass(slots=True, init=False)
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

    def __init__(
        self,
        key_event_id: str,
        fire_at: int,
        trigger_ts: int,
        event_ids: list[str],
        properties: dict[str, str],
        gap_ms: int | None = None,
        immediate: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.key_event_id = key_event_id
        self.fire_at = fire_at
        self.trigger_ts = trigger_ts
        self.event_ids = event_ids
        self.properties = properties
        self.gap_ms = gap_ms
        self.immediate = immediate
        self.extra = {} if extra is None else extra


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


def note_fired(state: CampaignState, key: str, fire_at: int) -> None:
    """Remember a firing for :func:`_cancel_fired`; firings out of the cancel window of this
    one, and all but the :data:`MAX_FIRED` most recent, are forgotten."""
    fired = [f for f in state.fired if f.fire_at + CANCEL_WINDOW_MS >= fire_at]
    fired.append(Fired(key, fire_at))
    if len(fired) > MAX_FIRED:
        del fired[: len(fired) - MAX_FIRED]
    state.fired = fired


def last_fire_at(state: CampaignState) -> int | None:
    """``fire_at`` of the latest remembered firing, if any."""
    fired = state.fired
    return max(f.fire_at for f in fired) if fired else None


def _cancel_fired(state: CampaignState, event: ClickEvent) -> list[str]:
    """A cancel event after decisions fired: the keys of every one it cancels (fired before it,
    within the cancel window), each once. The dispatcher drops those it still holds."""
    fired = state.fired
    if not fired:
        return []
    ts = event.ts
    cancelled = [f.key for f in fired if f.fire_at < ts <= f.fire_at + CANCEL_WINDOW_MS]
    if cancelled or any(f.fire_at + CANCEL_WINDOW_MS < ts for f in fired):
        # not yet due at this event: cancelled later
        state.fired = [f for f in fired if f.fire_at >= ts]
    return cancelled


def _fire_pending(st: CampaignState, before: int) -> list[Fire]:
    """Delayed firings due before ``before``, in fire_at order."""
    pending = st.pending
    if not pending:
        return []
    due = sorted((p for p in pending if p.fire_at < before), key=_fire_at)
    if due:
        st.pending = [p for p in pending if p.fire_at >= before]
    return [Fire(p.key, p.fire_at, p.ts, list(p.ids), dict(p.props), p.gap) for p in due]


def _fire_at(p: Pending) -> int:
    return p.fire_at


class AbsenceMachine:
    """A ``start`` event not followed by a ``cancel`` event within ``after``: the cart timer.

    State: ``episode``, the open episode or None; ``fired``, recent firings (late cancellations).
    """

    def __init__(self, trigger: AbsenceTrigger) -> None:
        self.t = trigger

    def fire_due(self, st: CampaignState, before: int) -> list[Fire]:
        ep = st.episode
        if ep is None or ep.deadline >= before:
            return []
        st.episode = None
        note_fired(st, ep.first_id, ep.deadline)
        return [Fire(ep.first_id, ep.deadline, ep.first_ts, list(ep.ids), dict(ep.props), ep.gap)]

    def on_event(
        self, st: CampaignState, ev: ClickEvent, gap_ms: int | None
    ) -> tuple[list[Fire], list[str]]:
        t = self.t
        cancelled: list[str] = []
        if ev.event_type in t.cancel:
            ep = st.episode
            if ep is not None and ev.ts <= ep.deadline:
                st.episode = None  # converted inside the window: no text
            # …and a text already decided for an earlier episode is no longer wanted either.
            cancelled = _cancel_fired(st, ev)
        elif ev.event_type in t.start and _matches(t.where, ev):
            ep = st.episode
            if ep is not None:
                ep.deadline = ev.ts + t.after_ms  # every further start restarts the timer
                _keep_ids(ep.ids, ev.event_id)
                ep.props = dict(ev.properties)  # render with the most recent cart
            else:
                st.episode = Episode(
                    ev.event_id, ev.ts, ev.ts + t.after_ms, [ev.event_id], dict(ev.properties),
                    gap_ms,
                )  # fmt: skip
        return [], cancelled


class RepeatMachine:
    """``count`` matching events with ts in ``[t - within, t]``, per ``group_by`` value.

    State: ``groups`` (the most recent ``count`` sightings per group: enough to know if ``count``
    fall in the window), ``group_fired`` (cooldown), ``pending`` (delayed firings).
    """

    def __init__(self, trigger: RepeatTrigger) -> None:
        self.t = trigger

    def fire_due(self, st: CampaignState, before: int) -> list[Fire]:
        return _fire_pending(st, before)

    def on_event(
        self, st: CampaignState, ev: ClickEvent, gap_ms: int | None
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
        groups = st.groups
        last_fire = st.group_fired
        horizon = ev.ts - t.within_ms
        seen = [x for x in groups.get(group, ()) if x.ts >= horizon]
        seen.append(Sighting(ev.ts, ev.event_id))
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
            event_ids=[x.event_id for x in seen],
            properties=dict(ev.properties),
            gap_ms=gap_ms,
            immediate=t.delay_ms == 0,
        )
        if t.delay_ms:
            st.pending.append(
                Pending(fire.fire_at, fire.key_event_id, ev.ts, fire.event_ids, fire.properties,
                        gap_ms)
            )  # fmt: skip
            return [], []
        return [fire], []

    def _prune(
        self, groups: dict[str, list[Sighting]], last_fire: dict[str, int], now: int, keep: str
    ) -> None:
        """Forget groups whose window and cooldown have both passed (bounded state)."""
        t = self.t
        stale = [
            g
            for g, xs in groups.items()
            if g != keep
            and (not xs or xs[-1].ts < now - t.within_ms)
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
            oldest = sorted(groups, key=lambda g: groups[g][-1].ts if groups[g] else 0)
            for g in oldest[: len(groups) - MAX_GROUPS]:
                if g != keep:
                    groups.pop(g, None)


class EventMachine:
    """Each matching event fires at ``ts + delay`` (or ``before`` a time held in a property),
    unless a ``cancel`` event arrives in ``(ts, fire_at]``.

    State: ``pending`` firings, ``last_scheduled`` (cooldown), ``fired`` (late cancellations).
    """

    def __init__(self, trigger: EventTrigger) -> None:
        self.t = trigger

    def fire_due(self, st: CampaignState, before: int) -> list[Fire]:
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
        self, st: CampaignState, ev: ClickEvent, gap_ms: int | None
    ) -> tuple[list[Fire], list[str]]:
        t = self.t
        cancelled: list[str] = []
        if ev.event_type in t.cancel:
            pending = st.pending
            if pending:
                st.pending = [p for p in pending if not (p.ts < ev.ts <= p.fire_at)]
            cancelled = _cancel_fired(st, ev)
        if ev.event_type != t.event or not _matches(t.where, ev):
            return [], cancelled
        fire_at = self.fire_at_for(ev)
        if fire_at is None:
            return [], cancelled
        previous = st.last_scheduled
        if t.cooldown_ms and previous is not None and ev.ts - previous < t.cooldown_ms:
            return [], cancelled
        st.last_scheduled = ev.ts
        if fire_at == ev.ts:
            note_fired(st, ev.event_id, fire_at)
            fire = Fire(ev.event_id, fire_at, ev.ts, [ev.event_id], dict(ev.properties), gap_ms)
            fire.immediate = True
            return [fire], cancelled
        st.pending.append(
            Pending(fire_at, ev.event_id, ev.ts, [ev.event_id], dict(ev.properties), gap_ms)
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
