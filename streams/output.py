"""Everything the trigger worker writes to Kafka goes through one confluent-kafka producer.

Decisions, cancellations, dead letters, flush markers and the ``user_state`` changelog records
(:mod:`streams.state.checkpoint`) share it. librdkafka batches in C threads: a record costs a few
microseconds here, where Faust's producer path cost tens (docs/performance.md).

Durability: :meth:`Output.wait` returns only once every record of the epochs it waits for is
acknowledged by the broker (``acks=all``); a checkpoint waits before it records a position,
so nothing the worker reports as consumed can be missing from its topics. A record the broker
finally refuses is not retried here: :meth:`Output.wait` raises :class:`OutputError` and the
worker stops, to restart from its last checkpoint (at least once, never a silent gap).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from processors.settings import Settings

log = logging.getLogger(__name__)

LINGER_MS = 5  # a decision waits at most this long for its batch (latency budget: 100 ms)
SOCKET_TIMEOUT_MS = 10_000
POLL_S = 0.05  # wait() polls for delivery reports in slices this long, in a thread
PARTITION_ANY = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses (by key)


class OutputError(RuntimeError):
    """The broker refused a record for good (message timeout, record too large, no topic)."""


class Output:
    """The worker's producer: fire-and-forget sends, and barriers that prove they landed.

    Every record belongs to an *epoch*; :meth:`barrier` closes the current one and
    :meth:`wait` returns once every record of that epoch and the earlier ones is acknowledged.
    Unlike ``flush()``, a barrier does not wait for records produced after it, so a checkpoint
    cannot be starved by a steady stream of new decisions, and the worker keeps processing
    while it waits.
    """

    def __init__(self, settings: Settings, *, client_id: str) -> None:
        self._producer = Producer(
            {
                **settings.kafka_common(),
                "client.id": client_id,
                "acks": "all",
                # Per partition, records land in the order they were sent, retries included:
                # a checkpoint's position record always follows the states it covers.
                "enable.idempotence": True,
                "linger.ms": LINGER_MS,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "queue.buffering.max.kbytes": 512 * 1024,
                # A broker outage stalls the worker rather than failing records: 10 minutes.
                "message.timeout.ms": 600_000,
                # A request on a connection that went dead without a reset (a partition, a
                # blackholing proxy) is given up after 10 s, not librdkafka's 60, and retried on a
                # new one: checkpoints (and so rebalances) would otherwise wait for it.
                "socket.timeout.ms": SOCKET_TIMEOUT_MS,
                "socket.keepalive.enable": True,
            }
        )
        self._failure: str | None = None
        self._epoch = 0
        self._produced: dict[int, int] = {0: 0}  # written by the event loop's thread only
        # One list per epoch, one item per delivery report: ``list.append`` is atomic, so the
        # callbacks (in whichever thread polls) take no lock unless a record failed.
        self._delivered: dict[int, list[None]] = {}
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="output")
        self._epoch_callback = self._callback(0, None)  # one per epoch, not one per record
        self._sends = 0

    def _callback(self, epoch: int, then: Callable[[Any, Any], None] | None) -> Callable[..., None]:
        acks = self._delivered.setdefault(epoch, [])
        ack = acks.append

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                with self._lock:
                    if self._failure is None:
                        self._failure = f"{err.name()} on topic {msg.topic()}"
            ack(None)
            if then is not None:
                then(err, msg)

        return on_delivery

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: Any = None,
        on_delivery: Callable[[Any, Any], None] | None = None,
    ) -> None:
        """Queue one record (blocks only while librdkafka's queue is full)."""
        epoch = self._epoch
        callback = (
            self._epoch_callback if on_delivery is None else self._callback(epoch, on_delivery)
        )
        where = PARTITION_ANY if partition is None else partition
        try:
            if headers is None:
                self._producer.produce(topic, value, key, where, callback)
            else:
                self._producer.produce(topic, value, key, where, callback, headers=headers)
        except BufferError:
            self._produce_when_room(topic, value, key, where, callback, headers)
        self._produced[epoch] += 1
        self._sent(1)

    def send_many(
        self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> None:
        """Queue ``(key, value)`` records for one partition, in order: :meth:`send` each, for a
        fraction of the Python work per record (a checkpoint's changelog records)."""
        callback = self._epoch_callback
        produce = self._producer.produce
        queued = 0
        try:
            for key, value in records:
                try:
                    produce(topic, value, key, partition, callback)
                except BufferError:
                    self._produce_when_room(topic, value, key, partition, callback, None)
                queued += 1
        finally:  # counted even when produce refuses one (e.g. too large): wait() stays exact
            self._produced[self._epoch] += queued
            self._sent(queued)

    def _produce_when_room(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int,
        callback: Callable[..., None],
        headers: Any,
    ) -> None:
        """librdkafka's queue is full: serve delivery reports until the record fits."""
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(topic, value, key, partition, callback, headers=headers)
                return
            except BufferError:
                continue

    def _sent(self, n: int) -> None:
        before = self._sends
        self._sends = before + n
        if before >> 10 != self._sends >> 10:
            self._producer.poll(0)  # serve delivery reports now and then between checkpoints

    def barrier(self) -> int:
        """Close the current epoch; :meth:`wait` on the returned value."""
        closed = self._epoch
        self._epoch += 1
        self._produced[self._epoch] = 0
        self._epoch_callback = self._callback(self._epoch, None)
        return closed

    def _pending(self, upto: int) -> int:
        delivered = self._delivered
        return sum(n - len(delivered.get(e, ())) for e, n in self._produced.items() if e <= upto)

    async def wait(self, upto: int) -> None:
        """Until every record of epochs ``<= upto`` is acknowledged; raises :class:`OutputError`
        if the broker refused one (the event loop keeps running meanwhile)."""
        loop = asyncio.get_running_loop()
        while self._pending(upto) > 0:
            await loop.run_in_executor(self._thread, self._producer.poll, POLL_S)
        for e in [e for e in self._produced if e <= upto]:
            self._delivered.pop(e, None)
            del self._produced[e]
        if self._failure is not None:
            raise OutputError(f"the broker refused a record: {self._failure}")

    async def flush(self) -> None:
        """Everything produced so far is acknowledged."""
        await self.wait(self.barrier())

    def flush_sync(self, timeout_s: float) -> int:
        """Blocking flush for shutdown paths; returns the number of records still queued."""
        return int(self._producer.flush(timeout_s))
