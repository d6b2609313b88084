"""Counters of one worker process (exposed for tests and shutdown logs; the operational view is
the Prometheus metrics of :mod:`processors.metrics`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerStats:
    """What one worker process has done since it started."""

    events: int = 0
    decisions: int = 0
    cancellations: int = 0
    duplicates: int = 0
    flushes: int = 0
    ticks: int = 0
    timer_errors: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
