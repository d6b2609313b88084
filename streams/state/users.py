"""The users' engine states as the worker reads and writes them.

A user's value is read through the checkpoint buffer (:mod:`streams.state.checkpoint`: the
newest change first, then the store), decoded at most once (:mod:`streams.state.cache`), and a
changed state goes back into the buffer as the live object (:class:`LiveState`, encoded by the
next checkpoint) while the partition's timer index (:mod:`streams.state.timers`) learns the
user's next wake-up. The index is rebuilt by :meth:`UserStates.scan` after a rebalance.
"""

from __future__ import annotations

import logging
from typing import Any

from processors.core.engine import Step, UserState
from streams.clients import Clients
from streams.episodes import Episodes
from streams.state.cache import LiveState, StateCache
from streams.state.checkpoint import is_position_key
from streams.state.timers import StoredState, TimerIndex, unpack_state

log = logging.getLogger(__name__)


class UserStates:
    """Load, store and roll back one user's state; the timer index over every user."""

    def __init__(
        self,
        clients: Clients,
        episodes: Episodes,
        *,
        cache_users: int,
        ordered: bool,
    ) -> None:
        """``ordered``: the live clock (ticks pop the timer index in deadline order); the event
        clock only reads it at end of input (:class:`streams.state.timers.PartitionTimers`)."""
        self.clients = clients
        self.episodes = episodes
        self.cache = StateCache(cache_users)
        self.timers = TimerIndex(self.scan, ordered=ordered)

    def load(self, user_key: bytes, raw: Any) -> UserState | None:
        """The user's state from what the buffer/store holds (the live object itself if it
        changed since the last checkpoint)."""
        if type(raw) is LiveState:
            return raw.state
        return self.cache.state(user_key, raw)

    def store(
        self,
        user_key: bytes,
        user_id: str,
        partition: int,
        step: Step,
        previous: Any,
        *,
        indexed: bool = False,
    ) -> None:
        """Buffer the user's new state (None = delete) as a :class:`LiveState`, encoded by the
        next checkpoint (``previous``: what the buffer or store held before the step).
        ``indexed``: the timer index still holds the user's wake-up from before the step (an
        event; not a move of time, which takes the user out of it): when the state was already
        buffered with that same wake-up, nothing is left to do."""
        state = step.state
        if (
            indexed
            and type(previous) is LiveState
            and previous.state is state
            and previous.wake_at == step.wake_at
            and self.timers.built
        ):
            return
        timers = self.timers.partition(partition)  # build the index before changing the table
        if state is None:
            if previous is not None:
                self.clients.checkpointer.put(partition, user_key, None)
            self.cache.forget(user_key)
            timers.discard(user_id)
            return
        if type(previous) is LiveState and previous.state is state:
            previous.wake_at = step.wake_at  # already buffered: the object is the state
        else:
            base = previous.base if type(previous) is LiveState else previous
            self.clients.checkpointer.put(
                partition,
                user_key,
                LiveState(self.cache, user_key, partition, state, step.wake_at, base),
            )
        timers.set(user_id, step.wake_at)

    def rollback(self, partition: int, user_key: bytes, raw: Any) -> None:
        """A step failed half-way through a state the engine changes in place: forget the
        decoded copy and, if the buffer held the live object, put back the value it had at the
        last checkpoint (changes of this user since then are dropped with it, and logged)."""
        self.cache.forget(user_key)
        if type(raw) is LiveState:
            log.error(
                "a user's state on partition %d goes back to its last checkpoint after an "
                "engine failure",
                partition,
            )
            self.clients.checkpointer.put(partition, user_key, raw.base)

    def clear(self) -> None:
        """Forget the timer index and the decoded states (partitions move: both are rebuilt
        from the table on first use)."""
        self.timers.clear()
        self.cache.clear()

    def scan(self) -> list[tuple[str, StoredState]]:
        """Every user state this worker holds (store and buffer): the timer index's rebuild
        scan, which also recounts the open episodes."""
        entries: list[tuple[str, StoredState]] = []
        clients = self.clients
        values: dict[bytes, bytes | None] = dict(clients.table.data.items())
        values.update(clients.checkpointer.buffered())  # not yet written
        for key, value in values.items():
            if value is None or is_position_key(key):
                continue
            try:
                entries.append((key.decode(), unpack_state(value)))
            except (ValueError, AttributeError):
                log.error("skipping an unreadable user_state entry while rebuilding timers")
        self.episodes.recount(entries, set(clients.reader.owned) if clients.reading else None)
        return entries
