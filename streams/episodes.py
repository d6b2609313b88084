"""``nudgeflow_open_episodes``: per campaign and partition, the users with a pending timer.

Maintained per step from each user's head state (committed plus the tail, so a cart shows as
open as soon as its event is applied, not only once the watermark has committed it); after a
rebalance it is recounted in the table scan that rebuilds the timer index
(:meth:`streams.state.users.UserStates.scan`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from processors import metrics
from processors.core.engine import UserState
from streams.state.timers import StoredState

_NONE_OPEN: frozenset[str] = frozenset()


class Episodes:
    """The open-episodes gauge of the campaigns this worker runs."""

    __slots__ = ("campaign_ids", "gauge")

    def __init__(self, campaign_ids: frozenset[str]) -> None:
        self.campaign_ids = campaign_ids
        self.gauge = metrics.PartitionedGauge(metrics.OPEN_EPISODES, campaign_ids)

    def open(self, state: UserState | None) -> frozenset[str]:
        """Campaigns with a pending timer (open episodes) in the user's head state."""
        if state is None:
            return _NONE_OPEN
        open_now = state.open_campaigns()
        if not open_now:
            return _NONE_OPEN
        ids = frozenset(open_now)
        return ids if ids <= self.campaign_ids else ids & self.campaign_ids

    def note(self, partition: int, before: frozenset[str], state: UserState | None) -> None:
        """The user's open campaigns went from ``before`` to those of ``state`` (most steps
        change none: no gauge update then)."""
        after = self.open(state)
        if before != after:
            self.gauge.change(partition, before, after)

    def recount(self, entries: Iterable[tuple[str, StoredState]], owned: set[int] | None) -> None:
        """Count again from every stored state (a table scan); ``owned``: the partitions read
        (None: those found in the scan). Only users with a pending wake-up can have an open
        episode, so only their states are decoded."""
        counts: dict[int, Counter[str]] = {}
        for _user_id, stored in entries:
            if stored.wake_at is None:
                continue
            try:
                open_now = self.open(UserState.from_bytes(stored.state))
            except (ValueError, TypeError):
                continue  # counted in no campaign; the timer itself still works
            if open_now:
                counts.setdefault(stored.partition, Counter()).update(open_now)
        self.gauge.reset(counts, set(counts) if owned is None else owned)

    def clear(self) -> None:
        self.gauge.clear()
