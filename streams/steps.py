"""One user's step through the engine: an event or a move of time.

Load the user's state (:class:`streams.state.users.UserStates`), call
:class:`processors.core.engine.Engine`, encode what it produced (:class:`streams.emit.Emitter`,
before the state is stored: an encoding error leaves the state as it was), buffer the new state
and note the user's open episodes. A step that fails puts the user back at the last checkpoint:
an event is dead-lettered (``internal_error``), a timer is dropped (the user's next event
re-arms it); the partition goes on either way.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from processors.core.engine import Step, UserState
from processors.core.events import ClickEvent
from streams.clients import Clients
from streams.emit import Emitter, Out
from streams.episodes import Episodes
from streams.state.checkpoint import Checkpointer
from streams.state.users import UserStates
from streams.stats import WorkerStats

log = logging.getLogger(__name__)

_NONE_OPEN: list[str] = []  # never changed


class Where:
    """Partition and offset of a clickstream record, for log lines."""

    __slots__ = ("partition", "offset")

    def __init__(self, partition: int, offset: int) -> None:
        self.partition = partition
        self.offset = offset


class StepEngine(Protocol):
    """What the steps call of :class:`processors.core.engine.Engine` (a protocol: a stand-in,
    or a patched method, is called as such by the compiled build too)."""

    def on_event(
        self, state: UserState | None, event: ClickEvent, watermark_ms: int | None = None
    ) -> Step: ...

    def on_time(self, state: UserState, watermark_ms: int) -> Step: ...


class Steps:
    """Applies events and timers to users' states (the caller holds the worker's lock)."""

    def __init__(
        self,
        engine: StepEngine,
        users: UserStates,
        episodes: Episodes,
        emitter: Emitter,
        clients: Clients,
        stats: WorkerStats,
    ) -> None:
        self.engine: StepEngine = engine
        self.users = users
        self.episodes = episodes
        self.emitter = emitter
        self.clients = clients
        self.stats = stats
        self.tick_watermarks: dict[int, int] = {}
        """Live clock: partition -> the last watermark a tick moved it to (written by
        :class:`streams.ticks.Ticks`), for :meth:`Engine.on_event`."""
        self._checkpointer: Checkpointer | None = None  # made at first use (no connection before)

    def on_click(
        self, click: ClickEvent, key: bytes, value: bytes, partition: int, offset: int
    ) -> list[Out] | None:
        """Apply one event (``key``: its record's key, which :func:`streams.intake.intake`
        checked is ``click.user_id`` encoded); the records to send (its dead letter if the step
        failed), None when there are none. The open-episodes gauge changes at the caller's
        :meth:`streams.episodes.Episodes.publish`."""
        raw: Any = None
        try:
            checkpointer = self._checkpointer
            if checkpointer is None:
                checkpointer = self._checkpointer = self.clients.checkpointer
            users = self.users
            raw = checkpointer.get(partition, key)
            state = users.load(key, raw)
            # The engine changes ``state`` in place: its open campaigns are read before.
            before = _NONE_OPEN if state is None else state.open_campaigns()
            step = self.engine.on_event(state, click, self.tick_watermarks.get(partition))
            out = None
            if step.decisions or step.cancellations or step.rejected:
                where = Where(partition, offset)
                out = self.emitter.records(step, current=(click, key, value, where))
                if state is not None and any(ev is click for ev, _ in step.rejected):
                    return out  # the event changed nothing
            new = step.state
            users.store(key, click.user_id, partition, step, raw, indexed=True)
            after = _NONE_OPEN if new is None else new.open_campaigns()
            if before != after:
                self.episodes.note_later(partition, before, after)  # published per batch
        except Exception as exc:  # an engine/state bug must not stop the partition
            self.users.rollback(partition, key, raw)
            log.exception(
                "engine failed on event %s (partition %d offset %d)",
                click.event_id,
                partition,
                offset,
            )
            where = Where(partition, offset)
            return [self.emitter.dead(key, value, "internal_error", type(exc).__name__, where)]
        return out

    def on_time(self, user_id: str, partition: int, watermark_ms: int) -> list[Out]:
        """Move the user's time to ``watermark_ms`` (the user leaves the timer index; the step
        puts its next wake-up back); the records to send."""
        timers = self.users.timers.partition(partition)
        timers.discard(user_id)
        user_key = user_id.encode()
        raw = None
        try:
            raw = self.clients.checkpointer.get(partition, user_key)
            state = self.users.load(user_key, raw)
            if state is None:
                return []
            before = state.open_campaigns()
            step = self.engine.on_time(state, watermark_ms)
            out = self.emitter.records(step, current=None)
            self.users.store(user_key, user_id, partition, step, raw)
            after = _NONE_OPEN if step.state is None else step.state.open_campaigns()
            if before != after:
                self.episodes.note(partition, before, after)
        except Exception:
            # The timer is dropped (the user's next event re-arms it).
            self.users.rollback(partition, user_key, raw)
            self.stats.timer_errors += 1
            log.exception("engine.on_time failed for a user of partition %d", partition)
            return []
        return out
