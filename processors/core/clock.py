"""The one injectable clock. Core code never reads the system time itself: the live shells pass
``SystemClock`` and replays pass ``ManualClock`` driven by event time, so both run the same code."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock time in epoch milliseconds."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that only moves when told to, and never backwards (event-clock replays)."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def advance_to(self, ms: int) -> int:
        if ms > self._now:
            self._now = ms
        return self._now
