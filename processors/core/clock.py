"""The one injectable clock. Core code never reads the system time itself: the live shells pass
``SystemClock`` and replays pass ``ManualClock`` driven by event time, so both run the same code."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol


def wall_ms() -> int:
    """The wall clock in epoch milliseconds: the one reading of the system time for the shells."""
    return time.time_ns() // 1_000_000


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    """Wall-clock time in epoch milliseconds."""

    def now_ms(self) -> int:
        return wall_ms()


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


class SourceTimes:
    """The event time of a replay read from several ordered sources (the partitions of the send
    topic), for releasing held sends.

    Each source's time is the latest item time read from it. A held send for a user may be
    released at ``t`` only once every source has reached ``t``: the user's own later items (an
    exit for that send) sit on one source, behind what that source has delivered so far, and
    which source is the user's is not known here. A source at its end of input no longer holds
    the time back; an open source with nothing read yet holds it at its start (None)."""

    def __init__(self) -> None:
        self._times: dict[int, int] = {}

    def observe(self, source: int, at_ms: int) -> None:
        if at_ms > self._times.get(source, -(2**63)):
            self._times[source] = at_ms

    def forget(self, source: int) -> None:
        """The source is no longer read here (a rebalance took it)."""
        self._times.pop(source, None)

    def common(self, sources: Iterable[int], ended: Callable[[int], bool]) -> int | None:
        """The time every source in ``sources`` has reached (ended ones ignored); None when an
        open source has delivered nothing yet, or no source is open."""
        least: int | None = None
        for source in sources:
            if ended(source):
                continue
            t = self._times.get(source)
            if t is None:
                return None
            if least is None or t < least:
                least = t
        return least
