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

from processors.core.engine import Engine
from processors.core.events import ClickEvent
from streams.clients import Clients
from streams.emit import Emitter, Out
from streams.episodes import Episodes
from streams.state.users import UserStates
from streams.stats import WorkerStats

log = logging.getLogger(__name__)


class Where:
    """Partition and offset of a clickstream record, for log lines."""

    __slots__ = ("partition", "offset")

    def __init__(self, partition: int, offset: int) -> None:
        self.partition = partition
        self.offset = offset


class Steps:
    """Applies events and timers to users' states (the caller holds the worker's lock)."""

    def __init__(
        self,
        engine: Engine,
        users: UserStates,
        episodes: Episodes,
        emitter: Emitter,
        clients: Clients,
        stats: WorkerStats,
    ) -> None:
        self.engine = engine
        self.users = users
        self.episodes = episodes
        self.emitter = emitter
        self.clients = clients
        self.stats = stats
        self.tick_watermarks: dict[int, int] = {}
        """Live clock: partition -> the last watermark a tick moved it to (written by
        :class:`streams.ticks.Ticks`), for :meth:`Engine.on_event`."""
        # Bound once: the per-event path calls them without attribute lookups.
        self._load, self._store, self._rollback = users.load, users.store, users.rollback
        self._open, self._note = episodes.open, episodes.note

    def on_click(
        self, click: ClickEvent, key: bytes | None, value: bytes, where: Where
    ) -> list[Out]:
        """Apply one event; the records to send (its dead letter if the step failed)."""
        partition = where.partition
        user_key = click.user_id.encode()  # == key: streams.intake checked it
        raw = None
        try:
            raw = self.clients.checkpointer.get(partition, user_key)
            state = self._load(user_key, raw)
            before = self._open(state)  # the engine changes ``state`` in place
            step = self.engine.on_event(state, click, self.tick_watermarks.get(partition))
            out = (
                self.emitter.records(step, current=(click, key, value, where))
                if step.decisions or step.cancellations or step.rejected
                else []
            )
            unchanged = state is not None and any(ev is click for ev, _ in step.rejected)
            if not unchanged:
                self._store(user_key, click.user_id, partition, step, raw)
                self._note(partition, before, step.state)
        except Exception as exc:  # an engine/state bug must not stop the partition
            self._rollback(partition, user_key, raw)
            log.exception(
                "engine failed on event %s (partition %d offset %d)",
                click.event_id,
                partition,
                where.offset,
            )
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
            state = self._load(user_key, raw)
            if state is None:
                return []
            before = self._open(state)
            step = self.engine.on_time(state, watermark_ms)
            out = self.emitter.records(step, current=None)
            self._store(user_key, user_id, partition, step, raw)
            self._note(partition, before, step.state)
        except Exception:
            # The timer is dropped (the user's next event re-arms it).
            self._rollback(partition, user_key, raw)
            self.stats.timer_errors += 1
            log.exception("engine.on_time failed for a user of partition %d", partition)
            return []
        return out
