"""The enabled campaigns as the engine applies them to one core: which campaigns read which
event type, each campaign's machine (and its send-timing variants' machines), and the three
steps that change a :class:`~processors.core.engine.state.Core`: apply an event, fire the
timers due, turn a firing into a decision."""

from __future__ import annotations

from processors.core import experiment, segment
from processors.core.campaign import AbsenceTrigger, Campaign, CampaignSet, RepeatTrigger
from processors.core.clock import Clock
from processors.core.decision import Decision, DecisionCancelled, make_decision_id
from processors.core.engine.state import Core, Step
from processors.core.events import ClickEvent
from processors.core.segment import Facts
from processors.core.trigger import CampaignState, Fire, Machine, machine_for

_VARIANTS_KEPT = 1 << 16  # users whose variant Rules.pick remembers, per campaign


class Rules:
    """Applies the campaigns to a core. ``dropped`` is set when applying on the head (no
    ``emit``) dropped what a commit would emit; ``exits`` collects the head's exits."""

    def __init__(self, campaigns: CampaignSet, clock: Clock | None, clock_name: str) -> None:
        self.campaigns: tuple[Campaign, ...] = campaigns.enabled
        self.machines: list[tuple[Campaign, Machine]] = [
            (c, machine_for(c)) for c in self.campaigns
        ]
        self.index = {c.id: i for i, c in enumerate(self.campaigns)}
        # event type -> the campaigns that react to it (most events touch one or none)
        self.by_type: dict[str, list[tuple[Campaign, Machine]]] = {}
        for c, m in self.machines:
            for t in c.event_types:
                self.by_type.setdefault(t, []).append((c, m))
        # Send-timing variants run their own machine (the user's variant never changes).
        self.variant_machines: dict[str, dict[str, Machine]] = {
            c.id: {v.id: machine_for(c, v.trigger) for v in c.variants}
            for c in self.campaigns
            if c.variants
        }
        # campaign id -> user id -> the user's variant id (a pure function of the two, hashed
        # once per user instead of at every event; emptied when it reaches _VARIANTS_KEPT)
        self.variant_ids: dict[str, dict[str, str | None]] = {
            cid: {} for cid in self.variant_machines
        }
        self.clock = clock
        self.clock_name = clock_name
        self.dropped = False
        self.exits: list[DecisionCancelled] | None = None
        # Event types some campaign reads whose commit is quiet -> the shortest timer they start
        # (see Engine._deferrable); types no campaign reads are quiet and start none.
        self.quiet_delay: dict[str, int] = {}
        for event_type, reactors in self.by_type.items():
            delays: list[int] = []
            for c, base in reactors:
                for m in (base, *self.variant_machines.get(c.id, {}).values()):
                    delay = _quiet_delay(m, event_type)
                    if delay is not None:
                        delays.append(delay)
                    else:
                        break
                else:
                    continue
                break
            else:
                self.quiet_delay[event_type] = min(delays)

    def pick(
        self, campaign: Campaign, machine: Machine, user_id: str
    ) -> tuple[Machine, str | None]:
        """The machine and variant id for this user (base machine when no variants)."""
        variants = self.variant_machines.get(campaign.id)
        if variants is None:
            return machine, None
        known = self.variant_ids[campaign.id]
        if user_id in known:
            vid = known[user_id]
        else:
            if len(known) >= _VARIANTS_KEPT:
                known.clear()
            vid = known[user_id] = experiment.variant_id(campaign, user_id)
        return variants.get(vid or "", machine), vid

    def apply(self, core: Core, ev: ClickEvent, emit: Step | None) -> list[Decision]:
        """Advance ``core`` to ``ev.ts`` (timers strictly before it) and apply ``ev``.

        Timer decisions and cancellations go to ``emit`` (the committed path) or are dropped
        (the head: they will be emitted when committed). Returns immediate decisions.
        """
        ts = ev.ts
        deadlines = core.deadlines
        if deadlines and min(deadlines.values()) < ts:
            if emit is None:
                self.dropped = True
            self.fire_timers(core, ts, emit, ev.user_id)
        facts = core.facts
        gap = segment.observe(facts, ev)
        reactors = self.by_type.get(ev.event_type)
        if not reactors:  # most events: no campaign reads this type
            return []
        immediate: list[Decision] = []
        states = core.campaigns
        user_id = ev.user_id
        for campaign, base in reactors:
            cid = campaign.id
            if cid in self.variant_machines:
                machine, variant = self.pick(campaign, base, user_id)
            else:
                machine, variant = base, None
            cs = states.get(cid)
            if cs is None:
                cs = states[cid] = CampaignState()
            elif cs.shared:  # copy on write (Core.clone)
                cs = states[cid] = cs.clone()
            fires, cancelled = machine.on_event(cs, ev, gap)
            deadline = cs.next_deadline()
            if deadline is None:
                deadlines.pop(cid, None)
                if cs.is_empty():
                    del states[cid]
            else:
                deadlines[cid] = deadline
            for fire in fires:
                d = self.decide(campaign, variant, user_id, fire, facts, emit)
                if d is not None:
                    immediate.append(d)
            if not cancelled:
                continue
            if emit is None:
                self.dropped = True
                exits = self.exits
                if exits is not None:  # the head: emitted at once (see the engine's doc)
                    for key in cancelled:
                        exits.append(
                            DecisionCancelled(
                                make_decision_id(cid, user_id, key), cid, user_id, "converted", ts
                            )
                        )
            else:
                for key in cancelled:
                    emit.cancellations.append(
                        DecisionCancelled(
                            make_decision_id(cid, user_id, key), cid, user_id, "converted", ts
                        )
                    )
        return immediate

    def fire_timers(self, core: Core, before: int, emit: Step | None, user_id: str) -> None:
        """Fire every timer of ``core`` strictly before ``before``, in fire_at order."""
        deadlines = core.deadlines
        if not deadlines or min(deadlines.values()) >= before:
            return
        fired: list[tuple[int, int, Decision]] = []
        for cid, deadline in list(deadlines.items()):
            if deadline >= before:
                continue
            index = self.index.get(cid)
            if index is None:  # campaign removed from the file since: forget its state
                del deadlines[cid]
                core.campaigns.pop(cid, None)
                continue
            campaign, base = self.machines[index]
            machine, variant = self.pick(campaign, base, user_id)
            cs = core.campaigns[cid]
            if cs.shared:  # copy on write (Core.clone)
                cs = core.campaigns[cid] = cs.clone()
            for fire in machine.fire_due(cs, before):
                d = self.decide(campaign, variant, user_id, fire, core.facts, emit)
                if d is not None:
                    fired.append((d.fire_at, index, d))
            deadline_now = cs.next_deadline()
            if deadline_now is None:
                del deadlines[cid]
                if cs.is_empty():
                    del core.campaigns[cid]
            else:
                deadlines[cid] = deadline_now
        if emit is not None and fired:
            fired.sort(key=_fire_order)
            emit.decisions.extend(d for _, _, d in fired)

    def decide(
        self,
        campaign: Campaign,
        variant: str | None,
        user_id: str,
        fire: Fire,
        facts: Facts,
        emit: Step | None,
    ) -> Decision | None:
        if not segment.matches(campaign.audience, facts, fire.gap_ms):
            if emit is not None:
                emit.filtered.append((campaign.id, "audience"))
            else:
                self.dropped = True
            return None
        return Decision(
            decision_id=make_decision_id(campaign.id, user_id, fire.key_event_id),
            campaign_id=campaign.id,
            user_id=user_id,
            fire_at=fire.fire_at,
            trigger_event_ids=tuple(fire.event_ids),
            trigger_ts=fire.trigger_ts,
            variant=variant,
            stage=segment.lifecycle_stage(facts),
            priority=campaign.priority,
            properties=fire.properties,
            clock=self.clock_name,
            decided_at=self.clock.now_ms() if self.clock else None,
        )


def _fire_order(x: tuple[int, int, Decision]) -> tuple[int, int]:
    return x[0], x[1]


def _quiet_delay(machine: Machine, event_type: str) -> int | None:
    """The shortest timer ``machine`` starts on ``event_type`` if applying it can emit nothing
    (no cancellation, no immediate firing); None when it can."""
    t = machine.t
    if isinstance(t, AbsenceTrigger):
        return None if event_type in t.cancel or t.after_ms <= 0 else t.after_ms
    if isinstance(t, RepeatTrigger):
        return t.delay_ms if t.delay_ms > 0 else None
    if event_type in t.cancel or t.wait_until is not None or t.delay_ms <= 0:
        return None
    return t.delay_ms
