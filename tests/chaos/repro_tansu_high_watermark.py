"""Reproducer (not a test): tansu 0.6 (memory storage) reports a partition's high watermark as
the base offset of its *last batch* + 1, not the last offset + 1.

1000 records produced in 11 batches read back as offsets 0-999, but ListOffsets says the end is
972 (the last batch holds offsets 971-999); with one record per batch it says 1000. Whatever
reads "to the end" stops early: Faust's table recovery skips the last changelog records of a
partition (a restarted worker resumes from older user states: the decisions those states would
have made are lost) and its standby recovery stops with ``ConsistencyError: The persisted offset
… is higher than the last offset``; the dispatcher's start-up read of the contacts topic can
miss the newest profiles until it polls them.

Run: ``PYTHONPATH=. .venv/bin/python tests/chaos/repro_tansu_high_watermark.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.chaos.harness import Broker


def end_offsets(bootstrap: str, topic: str, producer_conf: dict[str, object]) -> tuple[int, int]:
    """(last offset read + 1, high watermark the broker reports) after 1000 records."""
    producer = Producer({"bootstrap.servers": bootstrap, **producer_conf})
    for i in range(1000):
        producer.produce(topic, key=b"k", value=b"v" * 50)
        if i % 97 == 0:
            producer.flush()  # batch boundaries
    producer.flush()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "hw", "log_level": 2})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    last, deadline = -1, time.monotonic() + 10
    while last < 999 and time.monotonic() < deadline:
        for m in consumer.consume(500, timeout=0.5):
            offset = m.offset()
            if not m.error() and offset is not None:
                last = max(last, offset)
    _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)
    consumer.close()
    return last + 1, high


def main() -> int:
    broker = Broker(Path(tempfile.mkdtemp(prefix="tansu-hw-")))
    broker.start()
    wrong = False
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        cases: dict[str, dict[str, object]] = {
            "batched": {"linger.ms": 5},
            "one-record-batches": {"batch.num.messages": 1},
        }
        for fut in admin.create_topics([NewTopic(t, 1, 1) for t in cases]).values():
            fut.result()
        for topic, conf in cases.items():
            end, high = end_offsets(broker.bootstrap, topic, conf)
            print(f"{topic}: records end at {end}, broker high watermark {high}")
            wrong |= end != high
    finally:
        broker.stop()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
