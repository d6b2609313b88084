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
  same exit does not emit it again (``spec`` remembers it under ``"x:" + decision_id``). The
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
earlier tick) would take it (``tests/test_engine_live.py``); a new user costs two engine calls
instead of three.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any, cast

import cramjam
import orjson

from processors.core import experiment, segment
from processors.core.campaign import AbsenceTrigger, Campaign, CampaignSet, RepeatTrigger
from processors.core.clock import Clock
from processors.core.decision import Decision, DecisionCancelled, make_decision_id
from processors.core.events import ClickEvent, make_event
from processors.core.trigger import Fire, Machine, last_fire_at, machine_for

FLUSH_MS = 2**62  # watermark meaning "end of input": commit everything, fire every timer
DEDUP_WINDOW_MS = 24 * 3_600_000
DEFAULT_STATE_TTL_MS = 30 * 86_400_000
_REUSE_MIN = 2  # tail events a commit must save to take the head when a clone follows
_EXIT = "x:"  # spec key prefix: an exit emitted from the head, not yet committed

Core = dict[str, Any]  # {"f": facts, "c": {campaign_id: machine state}}

# UserState wire format (the ``user_state`` table and its changelog). The first byte says how the
# rest is encoded; every format holds the same JSON array, so all decode to identical states.
#   b"["   plain JSON (the original format; still written for ints beyond 64 bits)
#   0x01   orjson JSON (states under STATE_COMPRESS_MIN bytes)
#   0x02   LZ4 block (with its size prefix) of orjson JSON
# orjson encodes ~6x and decodes ~3x faster than the json module, and LZ4 halves the bytes per
# user (head and committed cores are near copies) for ~6 us more (docs/performance.md).
_STATE_JSON = 0x5B  # "["
_STATE_ORJSON = 0x01
_STATE_ORJSON_LZ4 = 0x02
STATE_COMPRESS_MIN = 256
_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS  # int keys become strings, as with json.dumps


class StateFormatError(ValueError):
    """Stored user state this version cannot read (corrupt, or written by a newer format)."""


def _clone(core: Core) -> Core:
    """A deep copy of a JSON-ready core (orjson round trip: ~10x a ``copy.deepcopy``)."""
    try:
        return cast(Core, orjson.loads(orjson.dumps(core, option=_ORJSON_OPTS)))
    except TypeError:  # e.g. an int beyond 64 bits: the json module keeps it exact
        return cast(Core, json.loads(json.dumps(core)))


def _new_core() -> Core:
    return {"f": segment.new_facts(), "c": {}}


_EMPTY_CORE: Core = _new_core()  # for comparison only: never handed out


def _entry_order(entry: list[Any]) -> tuple[int, int]:
    return entry[0], entry[1]


def _entry_ts(entry: list[Any]) -> int:
    return entry[0]  # type: ignore[no-any-return]


@dataclass(slots=True)
class UserState:
    user_id: str
    wm: int = -(2**62)  # committed watermark
    max_ts: int = -(2**62)
    seq: int = 0
    committed: Core = field(default_factory=_new_core)
    head: Core | None = None  # None when the tail is empty (head == committed)
    tail: list[list[Any]] = field(default_factory=list)  # [ts, seq, event record], sorted
    seen: dict[str, int] = field(default_factory=dict)  # event_id -> ts (de-duplication)
    # emitted, not yet committed: decision id -> [campaign, trigger ts] of an immediate
    # decision; "x:" + decision id -> [campaign, at] of an exit
    spec: dict[str, list[Any]] = field(default_factory=dict)
    # Not stored (a decoded state starts False): the head is the committed core with the tail
    # applied in order and applying it dropped nothing the commit would emit (a timer decision,
    # a cancellation, an audience filter), so committing the whole tail can take the head
    # instead of replaying the tail (Engine._commit).
    quiet: bool = field(default=False, compare=False, repr=False)

    def open_campaigns(self) -> frozenset[str]:
        """Campaigns with a pending timer (an open episode) in the head state: committed plus
        the tail, so a cart counts as open as soon as its event is applied."""
        core = self.head if self.head is not None else self.committed
        deadlines = core.get("d")
        return frozenset(deadlines) if deadlines else frozenset()

    def to_bytes(self) -> bytes:
        fields = [self.user_id, self.wm, self.max_ts, self.seq, self.committed, self.head,
                  self.tail, self.seen, self.spec]  # fmt: skip
        try:
            body = orjson.dumps(fields, option=_ORJSON_OPTS)
        except TypeError:  # e.g. an int beyond 64 bits: the json module keeps it exact
            return json.dumps(fields, separators=(",", ":")).encode()
        if len(body) < STATE_COMPRESS_MIN:
            return b"\x01" + body
        return b"\x02" + cramjam.lz4.compress_block(body)  # bytes + buffer: one copy

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        """Any format :meth:`to_bytes` wrote, old or new; ``StateFormatError`` if unreadable."""
        try:
            tag = data[0]
            if tag == _STATE_ORJSON_LZ4:
                fields = orjson.loads(memoryview(cramjam.lz4.decompress_block(data[1:])))
            elif tag == _STATE_ORJSON:
                fields = orjson.loads(data[1:])
            elif tag == _STATE_JSON:
                fields = json.loads(data)
            else:
                raise StateFormatError(f"unknown user state format byte 0x{tag:02x}")
            u, wm, mx, seq, committed, head, tail, seen, spec = fields
            if not (
                type(u) is str
                and type(wm) is int
                and type(mx) is int
                and type(seq) is int
                and type(committed) is dict
                and (head is None or type(head) is dict)
                and type(tail) is list
                and type(seen) is dict
                and type(spec) is dict
            ):
                raise StateFormatError("unreadable user state: a field has the wrong type")
        except StateFormatError:
            raise
        except (IndexError, ValueError, TypeError, cramjam.DecompressionError) as exc:
            raise StateFormatError(f"unreadable user state: {type(exc).__name__}") from None
        return cls(u, wm, mx, seq, committed, head, tail, seen, spec)


@dataclass(slots=True)
class Step:
    """What one call produced. ``state`` None means: delete the user's state."""

    state: UserState | None
    decisions: list[Decision] = field(default_factory=list)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    rejected: list[tuple[ClickEvent, str]] = field(default_factory=list)
    filtered: list[tuple[str, str]] = field(default_factory=list)  # (campaign, reason)
    wake_at: int | None = None


def _event_from(rec: dict[str, Any]) -> ClickEvent:
    """The tail's stored record as an event (it was validated when it arrived)."""
    return make_event(
        rec["event_id"], rec["user_id"], rec["event_type"], rec["ts"],
        rec.get("session_id"), rec.get("properties") or {},
    )  # fmt: skip


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
        self.lateness = allowed_lateness_ms
        self.clock = clock
        self.clock_name = clock_name
        self.state_ttl_ms = state_ttl_ms
        # Send-timing variants run their own machine (the user's variant never changes).
        self.variant_machines: dict[str, dict[str, Machine]] = {
            c.id: {v.id: machine_for(c, v.trigger) for v in c.variants}
            for c in self.campaigns
            if c.variants
        }
        self.lazy_commit = lazy_commit  # False: wake every tail for its commit (the reference)
        # False: every commit replays the tail on the committed core (the reference for
        # UserState.quiet; tests/test_engine_reuse.py)
        self.reuse_head = reuse_head
        self._dropped = False  # set by _apply on the head when it drops what a commit emits
        self._exits: list[DecisionCancelled] | None = None  # collects the head's exits
        # Event types some campaign reads whose commit is quiet -> the shortest timer they start
        # (see _deferrable); types no campaign reads are quiet and start none.
        self.quiet_delay: dict[str, int] = {}
        for event_type, reactors in self.by_type.items():
            delays = [
                _quiet_delay(m, event_type)
                for c, base in reactors
                for m in (base, *self.variant_machines.get(c.id, {}).values())
            ]
            if None not in delays:
                self.quiet_delay[event_type] = min(cast(list[int], delays))

    def _pick(
        self, campaign: Campaign, machine: Machine, user_id: str
    ) -> tuple[Machine, str | None]:
        """The machine and variant id for this user (base machine when no variants)."""
        variants = self.variant_machines.get(campaign.id)
        if variants is None:
            return machine, None
        vid = experiment.variant_id(campaign, user_id)
        return variants.get(vid or "", machine), vid

    # ------------------------------------------------------------------ public API

    def on_event(
        self, state: UserState | None, event: ClickEvent, watermark_ms: int | None = None
    ) -> Step:
        """Apply one event. ``watermark_ms``: the live clock's last tick watermark of the user's
        partition (None: event clock). A tail the eager schedule would have committed by then
        (its first event is before it) is committed to it first, as that tick would have done;
        a new user, or one whose tail no tick has reached, is not touched by it."""
        # The hot path (once per clickstream record): locals instead of repeated attribute
        # lookups, and the commit step is skipped when the watermark has not moved.
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
            and tail[0][0] < watermark_ms  # the eager wake-up (tail[0][0] + 1) was due
        )
        if ts < (cast(int, watermark_ms) if catch_up else st.wm):
            step.rejected.append((event, "late"))  # the state is left as it was
            step.wake_at = self.wake_at(st)
            return step
        seen[event.event_id] = ts
        if catch_up:
            self._commit(st, cast(int, watermark_ms), step)  # the skipped tick's commit
        seq = st.seq = st.seq + 1
        entry = [ts, seq, event.to_record()]
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
                head = st.head = _new_core() if committed == _EMPTY_CORE else _clone(committed)
                st.quiet = True
            self._dropped = False
            exits: list[DecisionCancelled] = []
            self._exits = exits
            made = self._apply(head, event, None)
            self._exits = None
            if self._dropped:
                st.quiet = False
            if exits:
                self._emit_exits(st, exits, step)
            if made:
                spec = st.spec
                for decision in made:
                    spec[decision.decision_id] = [decision.campaign_id, decision.trigger_ts]
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
            and watermark_ms - state.tail[-1][0] > self.state_ttl_ms
            and not state.committed.get("d")
            and self._deferrable(state)
            and not cast(Core, state.head).get("d")
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
        deadlines = st.committed.get("d")
        tail = st.tail
        if tail and self.lazy_commit and self._deferrable(st):
            due = min(deadlines.values()) + 1 if deadlines else None
            head_deadlines = cast(Core, st.head).get("d")
            if head_deadlines:
                first = min(head_deadlines.values()) + 1
                if due is None or first < due:
                    due = first
            return due if due is not None else tail[-1][0] + self.state_ttl_ms + 1
        if deadlines:
            due = min(deadlines.values()) + 1
            if tail and tail[0][0] + 1 < due:
                return tail[0][0] + 1  # type: ignore[no-any-return]
            return due
        if tail:
            return tail[0][0] + 1  # type: ignore[no-any-return]
        last_seen = st.committed["f"]["ls"]
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
        last = tail[-1][0]
        by_type = self.by_type
        quiet = self.quiet_delay
        for ts, _seq, rec in tail:
            event_type = rec["event_type"]
            if event_type in by_type:
                delay = quiet.get(event_type)
                if delay is None or last - ts > delay:
                    return False
        return True

    def _pending(self, st: UserState) -> bool:
        return bool(st.tail or st.committed.get("d"))

    # ------------------------------------------------------------------ internals

    def _apply(self, core: Core, ev: ClickEvent, emit: Step | None) -> list[Decision]:
        """Advance ``core`` to ``ev.ts`` (timers strictly before it) and apply ``ev``.

        Timer decisions and cancellations go to ``emit`` (the committed path) or are dropped
        (the head: they will be emitted when committed). Returns immediate decisions.
        """
        ts = ev.ts
        deadlines = core.get("d")
        if deadlines and min(deadlines.values()) < ts:
            if emit is None:
                self._dropped = True
            self._fire_timers(core, ts, emit, ev.user_id)
        facts = core["f"]
        gap = segment.observe(facts, ev)
        reactors = self.by_type.get(ev.event_type)
        if not reactors:  # most events: no campaign reads this type
            return []
        immediate: list[Decision] = []
        states = core["c"]
        variant_machines = self.variant_machines
        for campaign, base in reactors:
            cid = campaign.id
            if cid in variant_machines:
                machine, variant = self._pick(campaign, base, ev.user_id)
            else:
                machine, variant = base, None
            cs = states.get(cid)
            if cs is None:
                cs = states[cid] = {}
            fires, cancelled = machine.on_event(cs, ev, gap)
            deadline = machine.next_deadline(cs)
            if deadlines is None:
                deadlines = core["d"] = {}
            if deadline is None:
                deadlines.pop(cid, None)
            else:
                deadlines[cid] = deadline
            for fire in fires:
                d = self._decide(campaign, variant, ev.user_id, fire, facts, emit)
                if d is not None:
                    immediate.append(d)
            if cancelled and emit is None:
                self._dropped = True
                exits = self._exits
                if exits is not None:  # the head: emitted at once (see the module doc)
                    for key in cancelled:
                        exits.append(
                            DecisionCancelled(
                                make_decision_id(cid, ev.user_id, key),
                                cid,
                                ev.user_id,
                                "converted",
                                ts,
                            )
                        )
            elif emit is not None:
                for key in cancelled:
                    emit.cancellations.append(
                        DecisionCancelled(
                            make_decision_id(cid, ev.user_id, key), cid, ev.user_id, "converted", ts
                        )
                    )
        return immediate

    def _fire_timers(self, core: Core, before: int, emit: Step | None, user_id: str) -> None:
        deadlines = core.get("d")
        if not deadlines or min(deadlines.values()) >= before:
            return
        fired: list[tuple[int, int, Decision]] = []
        for cid, deadline in list(deadlines.items()):
            if deadline >= before:
                continue
            index = self.index.get(cid)
            if index is None:  # campaign removed from the file since: forget its timers
                del deadlines[cid]
                continue
            campaign, base = self.machines[index]
            machine, variant = self._pick(campaign, base, user_id)
            cs = core["c"][cid]
            for fire in machine.fire_due(cs, before):
                d = self._decide(campaign, variant, user_id, fire, core["f"], emit)
                if d is not None:
                    fired.append((d.fire_at, index, d))
            _note_deadline(core, cid, machine.next_deadline(cs))
        if emit is not None and fired:
            fired.sort(key=lambda x: (x[0], x[1]))
            emit.decisions.extend(d for _, _, d in fired)

    def _decide(
        self,
        campaign: Campaign,
        variant: str | None,
        user_id: str,
        fire: Fire,
        facts: Any,
        emit: Step | None,
    ) -> Decision | None:
        if not segment.matches(campaign.audience, facts, fire.gap_ms):
            if emit is not None:
                emit.filtered.append((campaign.id, "audience"))
            else:
                self._dropped = True
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

    def _commit(self, st: UserState, watermark: int, step: Step, fresh: bool = False) -> None:
        """Commit the tail before ``watermark``, fire the committed timers before it. ``fresh``:
        the tail's last entry is a new event not yet applied to the head."""
        if watermark <= st.wm:
            return
        tail = st.tail
        core = st.committed
        if tail and tail[0][0] < watermark:
            n = bisect.bisect_left(tail, watermark, key=_entry_ts)
            if (
                st.quiet
                and self.reuse_head
                and (n == len(tail) if not fresh else n == len(tail) - 1 and n >= _REUSE_MIN)
            ):
                # The whole (applied) tail: replaying it on the committed core would give the
                # head and emit nothing but the head's speculative decisions, which it confirms.
                # With a fresh event the head must then be cloned again (one clone costs about
                # one replayed event), so that takes a longer tail.
                core = st.committed = cast(Core, st.head)
                st.head = None
                st.quiet = False
                st.spec.clear()
            else:
                spec = st.spec
                first_exit = len(step.cancellations)
                for _ts, _seq, rec in tail[:n]:
                    for d in self._apply(core, _event_from(rec), step):
                        if spec.pop(d.decision_id, None) is None:
                            step.decisions.append(d)  # not seen by the head: emit now
                if spec and len(step.cancellations) > first_exit:
                    # exits the head emitted already are not emitted again
                    step.cancellations[first_exit:] = [
                        c
                        for c in step.cancellations[first_exit:]
                        if spec.pop(_EXIT + c.decision_id, None) is None
                    ]
            del tail[:n]
        deadlines = core.get("d")
        if deadlines and min(deadlines.values()) < watermark:
            self._fire_timers(core, watermark, step, st.user_id)
        st.wm = watermark
        # Speculative decisions whose event is now committed but that the committed state did
        # not confirm are withdrawn (only possible after reordering).
        # An exit of the head that the committed state did not make is forgotten (it cannot be
        # taken back: a conversion only ever suppresses).
        if st.spec:
            for did, (cid, ts) in list(st.spec.items()):
                if ts < watermark:
                    del st.spec[did]
                    if not did.startswith(_EXIT):
                        step.cancellations.append(
                            DecisionCancelled(did, cid, st.user_id, "reordered", ts)
                        )
        if not tail:
            st.head = None
            st.quiet = False

    def _rebuild_head(self, st: UserState, step: Step) -> None:
        """An out-of-order event: replay the tail in order and reconcile immediate decisions."""
        head = _clone(st.committed)
        made: dict[str, Decision] = {}
        exits: list[DecisionCancelled] = []
        self._exits = exits
        try:
            for _ts, _seq, rec in st.tail:
                for d in self._apply(head, _event_from(rec), emit=None):
                    made[d.decision_id] = d
        finally:
            self._exits = None
        st.head = head
        st.quiet = False
        if exits:
            self._emit_exits(st, exits, step)
        for did, (cid, ts) in list(st.spec.items()):
            if did not in made and not did.startswith(_EXIT):
                del st.spec[did]
                step.cancellations.append(DecisionCancelled(did, cid, st.user_id, "reordered", ts))
        for did, d in made.items():
            if did not in st.spec:
                st.spec[did] = [d.campaign_id, d.trigger_ts]
                step.decisions.append(d)

    def _emit_exits(self, st: UserState, exits: list[DecisionCancelled], step: Step) -> None:
        """Emit the head's exits not emitted before, and remember them for the commit."""
        spec = st.spec
        for c in exits:
            key = _EXIT + c.decision_id
            if key not in spec:
                spec[key] = [c.campaign_id, c.at]
                step.cancellations.append(c)

    def _prune_seen(self, st: UserState) -> None:
        if len(st.seen) > 32:
            horizon = st.max_ts - DEDUP_WINDOW_MS
            st.seen = {k: v for k, v in st.seen.items() if v >= horizon}

    def _last_fired(self, st: UserState) -> int:
        latest = -(2**62)
        for cs in st.committed["c"].values():
            last = last_fire_at(cs)
            if last is not None:
                latest = max(latest, last)
        return latest

    def _expired(self, st: UserState, watermark: int) -> bool:
        """Idle users are forgotten after the state TTL once nothing is pending."""
        last_seen = st.committed["f"]["ls"]
        if last_seen is None or self._pending(st):
            return False
        return watermark < FLUSH_MS and watermark - last_seen > self.state_ttl_ms


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


def _note_deadline(core: Core, campaign_id: str, deadline: int | None) -> None:
    """Keep ``core["d"]`` = {campaign: next deadline}: timers are checked without a scan."""
    deadlines = core.setdefault("d", {})
    if deadline is None:
        deadlines.pop(campaign_id, None)
    else:
        deadlines[campaign_id] = deadline


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
