"""Decoded engine states of recently active users, so an event does not decode its user's state.

Why: decoding a user's stored state (LZ4 + JSON) was ~15% of the worker's per-event CPU, and most
users send several events within minutes (docs/performance.md). The cache keeps the
:class:`~processors.core.engine.UserState` object next to the table value it stands for; an entry
is used only while the table value the worker reads (write-back buffer or store) is still that
value (same object, or equal bytes), so the cache can never serve a state the table does not
hold: a checkpoint, a restore from the changelog or another writer simply makes the entry stale
and the state is decoded again.

The engine changes a state in place. A changed state goes into the checkpoint buffer as a
:class:`LiveState` (the object itself, encoded only when the next checkpoint takes it, which
also records the encoded value here); when a step fails half-way the worker forgets the user and
puts back the value from before the first change since the last checkpoint
(:attr:`LiveState.base`). Bounded: past ``capacity`` users the older half is dropped (memory
stays flat however many distinct users pass through).
"""

from __future__ import annotations

from itertools import islice

from processors.core.engine import UserState
from streams.state.timers import pack_state, unpack_state

DEFAULT_CAPACITY = 20_000  # ~6 KB per decoded state: ~120 MB (NUDGEFLOW_STATE_CACHE_USERS)


class StateCache:
    """``user key -> (table value, decoded state)`` for the most recently written users."""

    __slots__ = ("capacity", "_entries", "hits", "misses")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._entries: dict[bytes, tuple[bytes, UserState]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, key: bytes, raw: bytes | None) -> UserState | None:
        """The decoded state of table value ``raw`` of user ``key`` (None: no state)."""
        if raw is None:
            return None
        entry = self._entries.get(key)
        if entry is not None and (entry[0] is raw or entry[0] == raw):
            self.hits += 1
            return entry[1]
        self.misses += 1
        return UserState.from_bytes(unpack_state(raw).state)

    def put(self, key: bytes, raw: bytes, state: UserState) -> None:
        """``state`` is what table value ``raw`` decodes to (the worker just encoded it)."""
        entries = self._entries
        entries.pop(key, None)  # re-inserted at the end: the oldest entries go first
        entries[key] = (raw, state)
        if len(entries) > self.capacity:
            if not self.capacity:
                entries.clear()
                return
            keep = len(entries) // 2
            self._entries = dict(islice(entries.items(), len(entries) - keep, None))

    def forget(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class LiveState:
    """A user's state changed since the last checkpoint, in the checkpoint buffer
    (:class:`streams.state.checkpoint.Deferred`): encoded once when the checkpoint takes it, however
    many events changed it in between."""

    __slots__ = ("cache", "key", "partition", "state", "wake_at", "base")

    def __init__(
        self,
        cache: StateCache,
        key: bytes,
        partition: int,
        state: UserState,
        wake_at: int | None,
        base: bytes | None,
    ) -> None:
        self.cache = cache
        self.key = key
        self.partition = partition
        self.state = state
        self.wake_at = wake_at
        self.base = base  # the table value before the first change (a failed step goes back to it)

    def encode(self) -> bytes:
        """The table value (``streams.state.timers.pack_state``); the cache learns it."""
        value = pack_state(self.partition, self.wake_at, self.state.to_bytes())
        self.cache.put(self.key, value, self.state)
        return value
