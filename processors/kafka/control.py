"""Control records: end-of-input markers that travel with the data through every topic.

A replay ends with one ``flush`` record per clickstream partition (``nudgeflow produce --flush``).
The worker, after firing that partition's pending timers, forwards a marker to *every* partition
of the send topic, naming its source partition and how many sources there are. A consumer knows
a partition is complete once it has seen markers from all sources on it (the records before a
marker on a partition were produced before it). The dispatcher does the same onto the outcomes
topic, so ``nudgeflow demo`` knows when everything has an outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from processors.kafka.headers import Headers, header

CONTROL_HEADER = "nudgeflow-control"
FLUSH = b"flush"
SOURCE_HEADER = "nudgeflow-flush-source"
SOURCES_HEADER = "nudgeflow-flush-sources"


def is_control(headers: Headers) -> bool:
    return header(headers, CONTROL_HEADER) is not None


def flush_headers(source: int, sources: int) -> list[tuple[str, bytes]]:
    return [
        (CONTROL_HEADER, FLUSH),
        (SOURCE_HEADER, str(source).encode()),
        (SOURCES_HEADER, str(sources).encode()),
    ]


@dataclass
class FlushTracker:
    """Which partitions of a topic have seen end-of-input markers from every source."""

    partitions: set[int] = field(default_factory=set)  # the partitions we must see complete
    seen: dict[int, set[int]] = field(default_factory=dict)
    expected: dict[int, int] = field(default_factory=dict)

    def observe(self, partition: int, headers: Headers) -> bool:
        """Record a flush marker; returns True when ``partition`` just became complete."""
        if header(headers, CONTROL_HEADER) != FLUSH:
            return False
        raw_source = header(headers, SOURCE_HEADER)
        raw_sources = header(headers, SOURCES_HEADER)
        source = int(raw_source) if raw_source else partition
        sources = int(raw_sources) if raw_sources else 1
        was = self.complete(partition)
        self.seen.setdefault(partition, set()).add(source)
        self.expected[partition] = sources
        return not was and self.complete(partition)

    def complete(self, partition: int) -> bool:
        return (
            partition in self.expected
            and len(self.seen.get(partition, ())) >= self.expected[partition]
        )

    def reopen(self, partition: int) -> None:
        """New input after an end of input: ``partition`` is open again (also on a revoke)."""
        self.seen.pop(partition, None)
        self.expected.pop(partition, None)

    def all_complete(self, partitions: Iterable[int] | None = None) -> bool:
        wanted = self.partitions if partitions is None else set(partitions)
        return bool(wanted) and all(self.complete(p) for p in wanted)
