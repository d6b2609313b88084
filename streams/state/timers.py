"""Per-partition timer index and the layout of the ``user_state`` table values.

Only users with a pending timer need ``engine.on_time`` when time moves (a tick or a flush), so
the worker keeps, per clickstream partition, a min-heap of ``(wake_at_ms, user_id)`` in memory.
The heap is *derived* data: the table (backed by its changelog) is the truth.

How the index survives restarts and rebalances: every table value carries the partition the user
lives on and the user's current ``wake_at`` in a small header
(:func:`processors.core.engine.state_format.pack_state`, which owns the bytes). The index of a
partition is built lazily, the first time the worker touches that partition after it was
assigned, by one scan over the table (:meth:`TimerIndex.partition`). A rebalance drops every
index (:meth:`TimerIndex.clear`); Faust pauses the streams until the table has been recovered from
its changelog, so the first touch after a rebalance always sees the recovered state.

Heap entries are invalidated lazily: ``push`` records the user's current deadline in a dict, and
``pop_due`` skips heap entries that no longer match it (the deadline moved, or was dropped).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from processors.core.engine.state_format import (
    NO_WAKE,
    StateFormatError,
    StoredState,
    pack_state,
    unpack_state,
)

__all__ = ["NO_WAKE", "StateFormatError", "StoredState", "pack_state", "unpack_state"]


class PartitionTimers:
    """Pending deadlines of the users of one partition. ``ordered`` False (the event clock, where
    only the end-of-input flush reads the index, through :meth:`all_users`): no heap is kept, so
    a deadline costs one dict write; :meth:`pop_due` then scans instead."""

    def __init__(self, ordered: bool = True) -> None:
        self._heap: list[tuple[int, str]] = []
        self._wake: dict[str, int] = {}
        self._ordered = ordered

    def __len__(self) -> int:
        return len(self._wake)

    def push(self, wake_at_ms: int, user_id: str) -> None:
        """Set the user's deadline (replaces any earlier one)."""
        if self._wake.get(user_id) == wake_at_ms:
            return
        self._wake[user_id] = wake_at_ms
        if not self._ordered:
            return
        heapq.heappush(self._heap, (wake_at_ms, user_id))
        if len(self._heap) > 2 * len(self._wake) + 64:
            self._compact()

    def discard(self, user_id: str) -> None:
        self._wake.pop(user_id, None)

    def set(self, user_id: str, wake_at_ms: int | None) -> None:
        if wake_at_ms is None:
            self.discard(user_id)
        else:
            self.push(wake_at_ms, user_id)

    def pop_due(self, now_ms: int) -> list[str]:
        """Users whose deadline is ``<= now_ms``, earliest first; they leave the index (the
        caller pushes their next deadline after ``on_time``)."""
        if not self._ordered:
            ready = sorted((w, u) for u, w in self._wake.items() if w <= now_ms)
            for _, user in ready:
                del self._wake[user]
            return [user for _, user in ready]
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            wake, user = heapq.heappop(heap)
            if self._wake.get(user) == wake:
                del self._wake[user]
                due.append(user)
        return due

    def next_wake(self) -> int | None:
        if not self._ordered:
            return min(self._wake.values(), default=None)
        while self._heap and self._wake.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def all_users(self) -> list[str]:
        """Every user with a pending deadline, earliest deadline first."""
        return sorted(self._wake, key=lambda u: (self._wake[u], u))

    def _compact(self) -> None:
        self._heap = [(w, u) for u, w in self._wake.items()]
        heapq.heapify(self._heap)


class TimerIndex:
    """The :class:`PartitionTimers` of every assigned partition, rebuilt lazily (module doc)."""

    def __init__(
        self, scan: Callable[[], Iterable[tuple[str, StoredState]]], ordered: bool = True
    ) -> None:
        """``scan`` yields ``(user_id, stored)`` for every table entry this worker holds;
        ``ordered``: see :class:`PartitionTimers`."""
        self._scan = scan
        self._ordered = ordered
        self._parts: dict[int, PartitionTimers] | None = None

    def partition(self, partition: int) -> PartitionTimers:
        """The index of ``partition``; the first call after a (re)start or rebalance scans the
        table once and indexes every partition found in it."""
        if self._parts is None:
            parts: dict[int, PartitionTimers] = {}
            for user_id, stored in self._scan():
                if stored.wake_at is not None:
                    parts.setdefault(stored.partition, PartitionTimers(self._ordered)).push(
                        stored.wake_at, user_id
                    )
            self._parts = parts
        timers = self._parts.get(partition)
        if timers is None:
            timers = self._parts[partition] = PartitionTimers(self._ordered)
        return timers

    def clear(self) -> None:
        """Forget every index (after a rebalance); the next use rebuilds them from the table."""
        self._parts = None

    @property
    def built(self) -> bool:
        return self._parts is not None
