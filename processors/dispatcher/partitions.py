"""The assigned partitions of the decisions topic and, with the event clock, how far each has
come: its replay time and whether it is at its end of input."""

from __future__ import annotations

from collections.abc import Iterable

from processors.core.clock import SourceTimes
from processors.dispatcher.offsets import TP
from processors.kafka.control import FlushTracker, Headers


class Partitions:
    """Assignment, replay time and end of input, per partition."""

    def __init__(self) -> None:
        self.assigned: set[TP] = set()
        self.ended = False  # the end of input was handled (markers written)
        self._flushes = FlushTracker()
        self._times = SourceTimes()  # event clock: the replay's time per partition

    def assign(self, tps: Iterable[TP]) -> None:
        self.assigned |= set(tps)

    def revoke(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.assigned.discard(tp)
            self._flushes.reopen(tp[1])
            self._times.forget(tp[1])

    def input(self, partitions: Iterable[int]) -> None:
        """New input: a partition at its end of input is open again."""
        for partition in partitions:
            if self._flushes.complete(partition):
                self._flushes.reopen(partition)
        self.ended = False

    def flush(self, partition: int, headers: Headers) -> None:
        """A flush marker read from ``partition``."""
        self._flushes.observe(partition, headers)

    def observe(self, partition: int, at_ms: int) -> None:
        """Event clock: ``partition`` has come to ``at_ms``."""
        self._times.observe(partition, at_ms)

    def replay_time(self) -> int | None:
        """Event clock: the time every assigned partition not at its end of input has reached
        (None: one has delivered nothing yet). A held send is released only then, so an exit
        for it, which comes on its user's partition before anything later on that partition,
        is never read after the replay's time released the send (``core.clock.SourceTimes``)."""
        return self._times.common((p for _t, p in self.assigned), self._flushes.complete)

    def end_of_input(self) -> bool:
        """Every assigned partition is at its end of input, not handled yet."""
        return (
            not self.ended
            and bool(self.assigned)
            and self._flushes.all_complete(p for _t, p in self.assigned)
        )
