"""Everything the trigger worker writes to Kafka goes through one confluent-kafka producer.

Decisions, cancellations, dead letters, flush markers and the ``user_state`` changelog records
(:mod:`streams.checkpoint`) share it. librdkafka batches in C threads: a record costs a few
microseconds here, where Faust's producer path cost tens (docs/performance.md).

Durability: :meth:`Output.flush` returns only once every record handed over so far is
acknowledged by the broker (``acks=all``); a checkpoint calls it before it records a position,
so nothing the worker reports as consumed can be missing from its topics. A record the broker
finally refuses is not retried here: :meth:`Output.flush` raises :class:`OutputError` and the
worker stops, to restart from its last checkpoint (at least once, never a silent gap).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from processors.settings import Settings

log = logging.getLogger(__name__)

LINGER_MS = 5  # a decision waits at most this long for its batch (latency budget: 100 ms)
FLUSH_POLL_S = 0.5  # flush() slices: the event loop's other tasks run in between


class OutputError(RuntimeError):
    """The broker refused a record for good (message timeout, record too large, no topic)."""


class Output:
    """The worker's producer: fire-and-forget sends, a flush that proves they all landed."""

    def __init__(self, settings: Settings, *, client_id: str) -> None:
        self._producer = Producer(
            {
                **settings.kafka_common(),
                "client.id": client_id,
                "acks": "all",
                "linger.ms": LINGER_MS,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "queue.buffering.max.kbytes": 512 * 1024,
                # A broker outage stalls the worker rather than failing records: 10 minutes.
                "message.timeout.ms": 600_000,
            }
        )
        self._failure: str | None = None

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None and self._failure is None:
            self._failure = f"{err.name()} on topic {msg.topic()}"

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: dict[str, bytes] | list[tuple[str, bytes]] | None = None,
        on_delivery: Any = None,
    ) -> None:
        """Queue one record (blocks only while librdkafka's queue is full)."""
        kwargs: dict[str, Any] = {"on_delivery": on_delivery or self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self._producer.produce(topic, value, key, **kwargs)
                break
            except BufferError:  # queue full: let deliveries drain
                self._producer.poll(0.05)
        self._producer.poll(0)

    def failed(self, err: KafkaError | None, msg: Message) -> None:
        """Delivery callback helper for callers that wrap :meth:`_on_delivery`."""
        self._on_delivery(err, msg)

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged (without blocking the event loop for
        more than :data:`FLUSH_POLL_S` at a time); raise :class:`OutputError` if one failed."""
        loop = asyncio.get_running_loop()
        remaining = self._producer.flush(0)
        while remaining:
            remaining = await loop.run_in_executor(None, self._producer.flush, FLUSH_POLL_S)
        if self._failure is not None:
            raise OutputError(f"the broker refused a record: {self._failure}")

    def flush_sync(self, timeout_s: float) -> int:
        """Blocking flush for shutdown paths; returns the number of records still queued."""
        return int(self._producer.flush(timeout_s))
