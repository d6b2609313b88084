"""Read Kafka topics from their start to their end as of now (the report, the demo's read-back)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from processors.kafka.control import is_control


def record_headers(msg: Any) -> list[tuple[str, bytes | None]]:
    """A record's headers as ``(name, bytes)`` pairs, whichever form the client returned."""
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def read_to_end(consumer: Any, topics: Sequence[str], timeout_s: float) -> Iterator[Any]:
    """Every data record of ``topics`` (control records and errors skipped), from each
    partition's low watermark to its high watermark when called. Assigns ``consumer``; raises
    ``TimeoutError`` when the end is not reached within ``timeout_s``."""
    from confluent_kafka import TopicPartition

    ends: dict[tuple[str, int], int] = {}
    assignment = []
    for t in topics:
        for p in consumer.list_topics(t, timeout=10).topics[t].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            if high > low:
                ends[(t, p)] = high
                assignment.append(TopicPartition(t, p, low))
    consumer.assign(assignment)
    deadline = time.monotonic() + timeout_s
    while ends:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{', '.join(topics)} not read to the end in {timeout_s:g} s")
        for msg in consumer.consume(1000, timeout=0.5):
            if msg.error() is not None:
                continue
            key = (msg.topic() or "", msg.partition() or 0)
            if (msg.offset() or 0) + 1 >= ends.get(key, 0):
                ends.pop(key, None)
            if not is_control(record_headers(msg)):
                yield msg
