"""The worker's garbage-collection policy and the pauses it causes.

Python's cyclic collector stops the event loop for as long as a pass takes, and a pass's cost
grows with the tracked objects of the generations it scans. The worker keeps those generations
young: everything alive at start-up is frozen (Faust, the campaigns, the codecs), and after each
checkpoint is taken whatever survived the last interval is frozen too (:meth:`GcPolicy.settle`),
so a pass scans only what was made since. Frozen objects are still freed by reference counting;
only a reference cycle that was alive at a freeze and dies later is never collected, which is
why the soak's memory growth is a benchmark target (ADR 37, docs/adr/0037-*.md).

Every pass is timed through :data:`gc.callbacks` into ``nudgeflow_gc_pause_seconds``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from processors import metrics
from processors.collector import settle_collector

WORKER_GC_THRESHOLDS = (100_000, 20, 20)
"""The worker's thresholds: a young pass only once more tracked objects survive than a
checkpoint interval leaves at the worker's rate (~4-5 per event); each checkpoint freezes them
(:meth:`GcPolicy.settle`) unscanned. The read loop makes no reference cycles (ADR 42)."""


class GcPolicy:
    """Installs the thresholds and the pause timer; :meth:`settle` freezes the survivors."""

    def __init__(self, thresholds: tuple[int, int, int] = WORKER_GC_THRESHOLDS) -> None:
        self.thresholds = thresholds
        self.passes = 0
        self.longest_s = 0.0
        self.settled = 0
        self._started = 0.0
        self._installed = False
        self._previous: tuple[int, int, int] | None = None
        self._unfreeze = False
        self._pauses = [metrics.GC_PAUSE.labels(str(g)) for g in range(3)]

    def install(self) -> None:
        """Collect and freeze what is alive now, set the thresholds, time every pass."""
        if self._installed:
            return
        self._installed = True
        self._previous = gc.get_threshold()
        self._unfreeze = gc.get_freeze_count() == 0  # a caller's own frozen objects stay so
        settle_collector(self.thresholds)
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        """Stop timing passes, restore the previous thresholds and, unless something was frozen
        before :meth:`install`, unfreeze (the next full pass scans everything again)."""
        if not self._installed:
            return
        self._installed = False
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._previous is not None:
            gc.set_threshold(*self._previous)
        if self._unfreeze:
            gc.unfreeze()

    def settle(self) -> None:
        """Freeze every tracked object alive now: later passes no longer scan them."""
        if self._installed:
            gc.freeze()
            self.settled += 1

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.passes += 1
        if pause > self.longest_s:
            self.longest_s = pause
        self._pauses[min(2, int(info.get("generation", 2)))].observe(pause)
