"""The per-user trigger engine: one code path for the Faust worker and ``nudgeflow backtest``.

Time model (see docs/design.md). Per user, events are de-duplicated by ``event_id`` and applied
in ``(ts, arrival)`` order. ``max_ts - allowed_lateness`` is the user's watermark: an event older
than it is *late* (rejected, dead-lettered by the shell). Everything before the watermark is
*committed*; events at or after it sit in a short *tail*.

* Timer firings (absence deadlines, delayed events) come only from the committed state, once the
  watermark has passed the deadline, so a cancel that arrives late-but-allowed is honoured.
* Immediate firings (fire_at == the event's ts) come at once from the *head* state (committed +
  tail). An out-of-order event rebuilds the head; decisions it no longer supports are withdrawn
  with ``DecisionCancelled(reason="reordered")`` and new ones are emitted. The final decision set
  therefore equals the time-sorted stream's, whatever the arrival order within the lateness.
* ``on_time`` moves the watermark without an event: the live clock's ticks (wall clock minus
  lateness) and the end-of-input flush of replays (``FLUSH_MS``).
* Exits (``DecisionCancelled(reason="converted")``) come at once from the head state, when the
  cancel event arrives, not one allowed lateness later: a conversion can only ever suppress a
  text, and the dispatcher may be holding that text (quiet hours) and release it meanwhile, or,
  in a replay, see the replay's time pass its release first. The commit that later derives the
  same exit does not emit it again (``spec`` remembers it under ``EXIT + decision_id``). The
  exit may therefore reach the send topic before its decision (the dispatcher keeps it for the
  decision); an exit the time-sorted stream would not make (only after reordering) cancels a
  decision that is never made or that the sorted stream also cancels.

Lazy commits (live clock, docs/performance.md): a tail whose commit cannot emit anything (no
speculative decision to confirm, no cancel event, no immediate trigger, and no timer it starts
can fall inside the tail) is not woken for its own commit; ``wake_at`` is then the next deadline
of the committed or head state, or the state TTL, and that wake-up commits the tail on the way.
``on_event(..., watermark_ms=)`` takes the partition's last tick watermark: a user whose
skipped commit that tick would have made is committed to it first, so an event behind it is
late as after the eager wake-up. The answers equal the eager schedule's except that such an
event, older than the last tick watermark, can be late where the eager engine (woken by an
earlier tick) would take it (``tests/unit/core/test_engine_live.py``); a new user costs two
engine calls instead of three.
"""

from __future__ import annotations

import bisect

from processors.core.campaign import CampaignSet
from processors.core.clock import Clock
from processors.core.decision import Decision, DecisionCancelled
from processors.core.engine.rules import Rules
from processors.core.engine.state import NEVER, Core, Speculation, Step, TailEntry, UserState
from processors.core.events import ClickEvent
from processors.core.trigger import last_fire_at

FLUSH_MS = 2**62  # watermark meaning "end of input": commit everything, fire every timer
DEDUP_WINDOW_MS = 24 * 3_600_000
DEFAULT_STATE_TTL_MS = 30 * 86_400_000
EXIT = "x:"  # spec key prefix: an exit emitted from the head, not yet committed


def _entry_order(entry: TailEntry) -> tuple[int, int]:
    return entry.ts, entry.seq


def _entry_ts(entry: TailEntry) -> int:
    return entry.ts


class Engine:
    """Applies campaigns to one user's events. Pure: no I/O; time comes from the events, the
    watermark passed to ``on_time`` and the injected clock (only for ``decided_at``)."""

    def __init__(
        self,
        campaigns: CampaignSet,
        *,
        allowed_lateness_ms: int = 30_000,
        clock: Clock | None = None,
        clock_name: str = "event",
        state_ttl_ms: int = DEFAULT_STATE_TTL_MS,
        lazy_commit: bool = True,
        reuse_head: bool = True,
    ) -> None:
        self.rules = Rules(campaigns, clock, clock_name)
        self.campaigns = self.rules.campaigns
        self.event_types = frozenset(self.rules.by_type)  # the types some campaign reads
        self.campaign_ids = frozenset(self.rules.index)
        self.lateness = allowed_lateness_ms
        self.clock = clock
        self.clock_name = clock_name
        self.state_ttl_ms = state_ttl_ms
        self.lazy_commit = lazy_commit  # False: wake every tail for its commit (the reference)
        # False: every commit replays the tail on the committed core (the reference for
        # UserState.quiet; tests/unit/core/test_engine_reuse.py)
        self.reuse_head = reuse_head

    # ------------------------------------------------------------------ public API

    def on_event(
        self, state: UserState | None, event: ClickEvent, watermark_ms: int | None = None
    ) -> Step:
        """Apply one event. ``watermark_ms``: the live clock's last tick watermark of the user's
        partition (None: event clock). A tail the eager schedule would have committed by then
        (its first event is before it) is committed to it first, as that tick would have done;
        a new user, or one whose tail no tick has reached, is not touched by it."""
        st = state if state is not None else UserState(event.user_id)
        step = Step(st)
        ts = event.ts
        seen = st.seen
        if event.event_id in seen:
            step.rejected.append((event, "duplicate"))
            step.wake_at = self.wake_at(st)
            return step
        tail = st.tail
        catch_up = (
            watermark_ms is not None
            and watermark_ms > st.wm
            and bool(tail)
            and tail[0].ts < watermark_ms  # the eager wake-up (tail[0].ts + 1) was due
        )
        if catch_up:
            assert watermark_ms is not None
            limit = watermark_ms
        else:
            limit = st.wm
        if ts < limit:
            step.rejected.append((event, "late"))  # the state is left as it was
            step.wake_at = self.wake_at(st)
            return step
        seen[event.event_id] = ts
        if catch_up:
            self._commit(st, limit, step)  # the skipped tick's commit
        seq = st.seq = st.seq + 1
        entry = TailEntry(ts, seq, event)
        in_order = ts >= st.max_ts
        if in_order:
            tail.append(entry)
            st.max_ts = ts
        else:
            bisect.insort(tail, entry, key=_entry_order)
            st.quiet = False  # the head is rebuilt below
        # Commit first: timer decisions now due are older than this event's immediate ones, so
        # the send topic sees them in fire_at order. The new event (ts >= watermark) stays in
        # the tail.
        watermark = st.max_ts - self.lateness
        if watermark > st.wm:
            self._commit(st, watermark, step, fresh=in_order)
        if in_order:
            head = st.head
            if head is None:
                # A new user's committed core is empty: build the copy instead of cloning.
                committed = st.committed
                head = st.head = Core() if committed.is_new() else committed.clone()
                st.quiet = True
            rules = self.rules
            rules.dropped = False
            exits: list[DecisionCancelled] = []
            rules.exits = exits
            made = rules.apply(head, event, None)
            rules.exits = None
            if rules.dropped:
                st.quiet = False
            if exits:
                self._emit_exits(st, exits, step)
            if made:
                spec = st.spec
                for decision in made:
                    spec[decision.decision_id] = Speculation(
                        decision.campaign_id, decision.trigger_ts
                    )
                step.decisions.extend(made)
        else:
            self._rebuild_head(st, step)
        if len(st.seen) > 32:
            self._prune_seen(st)
        step.wake_at = self.wake_at(st)
        return step

    def on_time(self, state: UserState, watermark_ms: int) -> Step:
        """Move the watermark (live-clock tick, or ``FLUSH_MS`` at end of input)."""
        if (
            self.lazy_commit
            and watermark_ms < FLUSH_MS
            and state.tail
            and watermark_ms - state.tail[-1].ts > self.state_ttl_ms
            and not state.committed.deadlines
            and self._deferrable(state)
            and state.head is not None
            and not state.head.deadlines
        ):
            # A lazily uncommitted quiet tail at its TTL: its commit would emit nothing and leave
            # nothing pending, so the user expires without replaying it.
            return Step(None)
        step = Step(state)
        self._commit(state, watermark_ms, step)
        if watermark_ms >= FLUSH_MS:
            # After a flush, time stands at the latest thing we have seen or fired.
            state.wm = max(state.max_ts + 1, self._last_fired(state) + 1)
        if self._expired(state, watermark_ms):
            step.state = None
            return step
        step.wake_at = self.wake_at(state)
        return step

    def wake_at(self, st: UserState) -> int | None:
        """The watermark at which ``on_time`` has work: the next deadline, tail commit, or (when
        nothing is pending) the end of the idle user's state TTL, so live ticks forget them.
        A quiet tail (:meth:`_deferrable`) waits for the next deadline of the committed or head
        state, or for the TTL, and is committed then."""
        deadlines = st.committed.deadlines
        tail = st.tail
        head = st.head
        if tail and self.lazy_commit and head is not None and self._deferrable(st):
            due = min(deadlines.values()) + 1 if deadlines else None
            head_deadlines = head.deadlines
            if head_deadlines:
                first = min(head_deadlines.values()) + 1
                if due is None or first < due:
                    due = first
            return due if due is not None else tail[-1].ts + self.state_ttl_ms + 1
        if deadlines:
            due = min(deadlines.values()) + 1
            if tail and tail[0].ts + 1 < due:
                return tail[0].ts + 1
            return due
        if tail:
            return tail[0].ts + 1
        last_seen = st.committed.facts.last_seen
        return None if last_seen is None else last_seen + self.state_ttl_ms + 1

    def _deferrable(self, st: UserState) -> bool:
        """Committing the tail now or at the next deadline emits the same (nothing now): no
        speculative decision waits for it (``spec``), every event is of a quiet type (no cancel,
        no immediate firing, hence no "converted" or "reordered" cancellation, no audience
        filtering), and no timer a tail event starts is due before the tail's last event (so the
        head fired no decision inside the tail that only the commit would emit)."""
        if st.spec or st.head is None:
            return False
        tail = st.tail
        last = tail[-1].ts
        by_type = self.rules.by_type
        quiet = self.rules.quiet_delay
        for entry in tail:
            event_type = entry.event.event_type
            if event_type in by_type:
                delay = quiet.get(event_type)
                if delay is None or last - entry.ts > delay:
                    return False
        return True

    def _pending(self, st: UserState) -> bool:
        return bool(st.tail or st.committed.deadlines)

    # ------------------------------------------------------------------ internals

    def _commit(self, st: UserState, watermark: int, step: Step, fresh: bool = False) -> None:
        """Commit the tail before ``watermark``, fire the committed timers before it. ``fresh``:
        the tail's last entry is a new event not yet applied to the head."""
        if watermark <= st.wm:
            return
        tail = st.tail
        core = st.committed
        rules = self.rules
        if tail and tail[0].ts < watermark:
            n = bisect.bisect_left(tail, watermark, key=_entry_ts)
            head = st.head
            if (
                st.quiet
                and head is not None
                and self.reuse_head
                and n == (len(tail) - 1 if fresh else len(tail))
            ):
                # The whole (applied) tail: replaying it on the committed core would give the
                # head and emit nothing but the head's speculative decisions, which it confirms.
                # With a fresh event the head is then cloned again (copy on write: cheaper than
                # one replayed event).
                core = st.committed = head
                st.head = None
                st.quiet = False
                st.spec.clear()
            else:
                spec = st.spec
                first_exit = len(step.cancellations)
                for entry in tail[:n]:
                    for d in rules.apply(core, entry.event, step):
                        if spec.pop(d.decision_id, None) is None:
                            step.decisions.append(d)  # not seen by the head: emit now
                if spec and len(step.cancellations) > first_exit:
                    # exits the head emitted already are not emitted again
                    step.cancellations[first_exit:] = [
                        c
                        for c in step.cancellations[first_exit:]
                        if spec.pop(EXIT + c.decision_id, None) is None
                    ]
            del tail[:n]
        deadlines = core.deadlines
        if deadlines and min(deadlines.values()) < watermark:
            rules.fire_timers(core, watermark, step, st.user_id)
        st.wm = watermark
        # Speculative decisions whose event is now committed but that the committed state did
        # not confirm are withdrawn (only possible after reordering).
        # An exit of the head that the committed state did not make is forgotten (it cannot be
        # taken back: a conversion only ever suppresses).
        if st.spec:
            for did, s in list(st.spec.items()):
                if s.at < watermark:
                    del st.spec[did]
                    if not did.startswith(EXIT):
                        step.cancellations.append(
                            DecisionCancelled(did, s.campaign_id, st.user_id, "reordered", s.at)
                        )
        if not tail:
            st.head = None
            st.quiet = False

    def _rebuild_head(self, st: UserState, step: Step) -> None:
        """An out-of-order event: replay the tail in order and reconcile immediate decisions."""
        head = st.committed.clone()
        made: dict[str, Decision] = {}
        exits: list[DecisionCancelled] = []
        rules = self.rules
        rules.exits = exits
        try:
            for entry in st.tail:
                for d in rules.apply(head, entry.event, None):
                    made[d.decision_id] = d
        finally:
            rules.exits = None
        st.head = head
        st.quiet = False
        if exits:
            self._emit_exits(st, exits, step)
        for did, s in list(st.spec.items()):
            if did not in made and not did.startswith(EXIT):
                del st.spec[did]
                step.cancellations.append(
                    DecisionCancelled(did, s.campaign_id, st.user_id, "reordered", s.at)
                )
        for did, d in made.items():
            if did not in st.spec:
                st.spec[did] = Speculation(d.campaign_id, d.trigger_ts)
                step.decisions.append(d)

    def _emit_exits(self, st: UserState, exits: list[DecisionCancelled], step: Step) -> None:
        """Emit the head's exits not emitted before, and remember them for the commit."""
        spec = st.spec
        for c in exits:
            key = EXIT + c.decision_id
            if key not in spec:
                spec[key] = Speculation(c.campaign_id, c.at)
                step.cancellations.append(c)

    def _prune_seen(self, st: UserState) -> None:
        horizon = st.max_ts - DEDUP_WINDOW_MS
        st.seen = {k: v for k, v in st.seen.items() if v >= horizon}

    def _last_fired(self, st: UserState) -> int:
        latest = NEVER
        for cs in st.committed.campaigns.values():
            last = last_fire_at(cs)
            if last is not None and last > latest:
                latest = last
        return latest

    def _expired(self, st: UserState, watermark: int) -> bool:
        """Idle users are forgotten after the state TTL once nothing is pending."""
        last_seen = st.committed.facts.last_seen
        if last_seen is None or self._pending(st):
            return False
        return watermark < FLUSH_MS and watermark - last_seen > self.state_ttl_ms


def flush_all(engine: Engine, states: dict[str, UserState]) -> Step:
    """End of input for a whole store (backtest): fire every pending timer, in fire_at order."""
    total = Step(None)
    for user_id in list(states):
        step = engine.on_time(states[user_id], FLUSH_MS)
        if step.state is None:
            del states[user_id]
        total.decisions.extend(step.decisions)
        total.cancellations.extend(step.cancellations)
        total.filtered.extend(step.filtered)
    return total
