"""Liveness: a worker that stopped making progress exits, so that its supervisor restarts it.

Two stalls are caught, by a thread (so a blocked event loop cannot hide its own stall):

* the event loop stopped running: :meth:`Watchdog.beat`, a timer task, has not run for the
  limit;
* a rebalance or table recovery that neither ends nor moves: Faust reports ``rebalancing`` or
  ``in_recovery``, or the group no longer knows the worker (its membership expired, e.g. after
  a broker restart, and the rejoin does not complete), for the limit while the recovery's
  offsets and the group's rebalance count stay the same (Faust's rejoin and recovery can hang
  after a broker restart; a restart recovers from the changelog).

A long recovery that is still reading the changelog is progress, not a stall. The exit code is
75 (EX_TEMPFAIL), as for a failed last checkpoint: restart me.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from streams.app import membership_lost

log = logging.getLogger("nudgeflow.worker")

EXIT_STALLED = 75
CHECK_INTERVAL_S = 5.0
BEAT_INTERVAL_S = 1.0


@dataclass
class Stall:
    """How long a busy state has gone without progress (pure; the watchdog feeds it)."""

    limit_s: float
    since: float | None = None
    progress: Hashable = None

    def observe(self, now: float, busy: bool, progress: Hashable) -> bool:
        """Record one look; True when busy with the same progress for ``limit_s`` or more."""
        if not busy:
            self.since = None
            return False
        if self.since is None or progress != self.progress:
            self.since, self.progress = now, progress
            return False
        return now - self.since >= self.limit_s


def faust_progress(
    app: Any, lost: Callable[[Any], bool] = membership_lost
) -> tuple[bool, Hashable]:
    """(rebalancing, recovering or out of the group, a value that changes while any moves on)."""
    recovery = getattr(getattr(app, "tables", None), "recovery", None)
    in_recovery = bool(getattr(recovery, "in_recovery", False))
    offsets: tuple[int, ...] = ()
    if recovery is not None:
        offsets = (
            _total(getattr(recovery, "active_offsets", None)),
            _total(getattr(recovery, "standby_offsets", None)),
        )
    busy = bool(getattr(app, "rebalancing", False)) or in_recovery or lost(app)
    return busy, (getattr(app, "rebalancing_count", 0), *offsets)


def _total(offsets: Any) -> int:
    """Sum of the known offsets (Faust keeps None for a partition not read yet)."""
    if not offsets:
        return 0
    return sum(v for v in offsets.values() if isinstance(v, int))


class Watchdog:
    """Checks every :data:`CHECK_INTERVAL_S` from its own thread; ``limit_s`` <= 0 disables it."""

    def __init__(
        self,
        app: Any,
        limit_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        exit: Callable[[int], object] = os._exit,
        progress: Callable[[Any], tuple[bool, Hashable]] = faust_progress,
    ) -> None:
        self.app = app
        self.limit_s = limit_s
        self._clock = clock
        self._exit = exit
        self._progress = progress
        self._stall = Stall(limit_s)
        self._beat: float | None = None  # the loop's last beat; None before its first
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    async def beat(self) -> None:
        """A timer task: the event loop is running."""
        self._beat = self._clock()
        if self._thread is None and self.limit_s > 0:
            self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> str | None:
        """One look: why the worker should exit, or None."""
        now = self._clock()
        if self._beat is not None and now - self._beat >= self.limit_s:
            return f"the event loop has not run for {now - self._beat:.0f} s"
        busy, progress = self._progress(self.app)
        if self._stall.observe(now, busy, progress):
            limit = f"{self.limit_s:.0f} s"
            return f"a rebalance, group rejoin or table recovery has not moved for {limit}"
        return None

    def _run(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                why = self.check()
            except Exception:  # a look that failed is no verdict; the next one may succeed
                log.exception("worker watchdog: a check failed")
                continue
            if why is not None:
                log.critical("worker stalled: %s; it exits to be restarted", why)
                self._exit(EXIT_STALLED)
                return
