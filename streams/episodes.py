"""``nudgeflow_open_episodes``: per campaign and partition, the users with a pending timer.

Maintained per step from each user's head state (committed plus the tail, so a cart shows as
open as soon as its event is applied, not only once the watermark has committed it): the step
compares the engine's lists of open campaigns before and after and calls :meth:`Episodes.note`
only when they differ (most steps change none); after a
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

    __slots__ = ("campaign_ids", "gauge", "_pending")

    def __init__(self, campaign_ids: frozenset[str]) -> None:
        self.campaign_ids = campaign_ids
        self.gauge = metrics.PartitionedGauge(metrics.OPEN_EPISODES, campaign_ids)
        self._pending: dict[int, dict[str, int]] = {}  # partition -> campaign -> users in - out

    def open(self, state: UserState | None) -> frozenset[str]:
        """Campaigns with a pending timer (open episodes) in the user's head state."""
        return _NONE_OPEN if state is None else self._known(state.open_campaigns())

    def note(self, partition: int, before: list[str], after: list[str]) -> None:
        """A user's open campaigns (:meth:`UserState.open_campaigns`, the caller calls this only
        when they differ) went from ``before`` to ``after``: the gauge changes now."""
        was, now = self._known(before), self._known(after)
        if was != now:
            self.gauge.change(partition, was, now)

    def note_later(self, partition: int, before: list[str], after: list[str]) -> None:
        """:meth:`note`, the gauge changing at the next :meth:`publish` (once per batch)."""
        was, now = self._known(before), self._known(after)
        if was == now:
            return
        pending = self._pending.get(partition)
        if pending is None:
            pending = self._pending[partition] = {}
        for campaign in was - now:
            pending[campaign] = pending.get(campaign, 0) - 1
        for campaign in now - was:
            pending[campaign] = pending.get(campaign, 0) + 1

    def publish(self) -> None:
        """Apply the changes :meth:`note_later` kept (one gauge update per campaign and
        partition)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for partition, deltas in pending.items():
            self.gauge.add(partition, deltas)

    def _known(self, open_now: list[str]) -> frozenset[str]:
        if not open_now:
            return _NONE_OPEN
        ids = frozenset(open_now)
        return ids if ids <= self.campaign_ids else ids & self.campaign_ids

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
        self._pending = {}  # the scan saw those changes: they are in ``counts``
        self.gauge.reset(counts, set(counts) if owned is None else owned)

    def clear(self) -> None:
        self._pending = {}
        self.gauge.clear()
