"""Reproducer (not a test): tansu 0.6 (memory storage) answers every fetch of a partition that
holds tens of thousands of small record batches *empty* when the consumer's
``fetch.wait.max.ms`` is short.

A producer with ``linger.ms`` 1 at 2,000 records/s makes a batch of nearly every record. After
100,000 such records (25,000 per partition) a consumer with ``fetch.wait.max.ms`` 10 (what the
worker's clickstream reader used) reads a few dozen records and then nothing, from any offset,
for good, while tansu burns CPU; with 50 or 200 ms, or the default 500, it reads all 100,000,
and so it does with 10 ms when the records came in batches of ~10 (``linger.ms`` 20) or when
there are 50,000. Why (tansu-storage 0.6 ``dynostore.rs``, ``fetch``): every fetch with data
to return first lists every batch object of the partition and parses its offset, so a fetch
costs O(batches in the partition), and a short wait runs out before the listing does. This
stalled the live benchmark at 2,000 events/s (the reader "fetched nothing for 22 s with
records waiting", over and over) and slowed the after-outage catch-up of ``make chaos`` to
10-25 events/s until its feeder batched (docs/chaos.md). A reader found stuck now waits 500 ms
per fetch (streams/agents.py).

Run: ``PYTHONPATH=. .venv/bin/python tests/chaos/repro_tansu_small_batches.py [n] [linger] [wait]``
(records, the producer's ``linger.ms``, the consumer's ``fetch.wait.max.ms``; defaults 100000, 1,
10; ~1 minute). Exit 1 when records could not be read back.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from processors.devstack import EmbeddedStack

PARTITIONS = 4
RATE_PER_S = 2000
FETCH_WAIT_MS = int(sys.argv[3]) if len(sys.argv) > 3 else 10  # the worker's reader: 10


def main() -> int:
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    linger_ms = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    state_dir = Path(tempfile.mkdtemp(prefix="tansu-batches-"))
    stack = EmbeddedStack()
    bootstrap = stack.up(state_dir).bootstrap_servers
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("t", PARTITIONS, 1)])["t"].result(15)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms})
        start = time.monotonic()
        for i in range(records):  # paced like a live clickstream
            while time.monotonic() < start + i / RATE_PER_S:
                producer.poll(0.001)
            producer.produce("t", key=f"u{i}".encode(), value=b"v" * 60)
            producer.poll(0)
        producer.flush(30)
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "r",
                "log_level": 2,
                "fetch.wait.max.ms": FETCH_WAIT_MS,
            }
        )
        consumer.assign([TopicPartition("t", p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        got, quiet = 0, time.monotonic()
        while time.monotonic() - quiet < 15:
            msgs = [m for m in consumer.consume(5000, timeout=0.5) if m.error() is None]
            if msgs:
                got, quiet = got + len(msgs), time.monotonic()
        consumer.close()
        print(f"{records} records produced with linger.ms={linger_ms}: {got} read back")
        return 0 if got == records else 1
    finally:
        stack.down(state_dir)


if __name__ == "__main__":
    sys.exit(main())
