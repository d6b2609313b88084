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
        self._delivered: dict[int, int] = {}  # written by delivery callbacks, under the lock
        self._lock = threading.Lock()  # callbacks run in whichever thread polls
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="output")
        self._epoch_callback = self._callback(0, None)  # one per epoch, not one per record
        self._sends = 0

    def _callback(self, epoch: int, then: Callable[[Any, Any], None] | None) -> Callable[..., None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            with self._lock:
                self._delivered[epoch] = self._delivered.get(epoch, 0) + 1
                if err is not None and self._failure is None:
                    self._failure = f"{err.name()} on topic {msg.topic()}"
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
        callback = self._epoch_callback if on_delivery is None else None
        if callback is None:
            callback = self._callback(epoch, on_delivery)
        while True:
            try:
                if partition is None:
                    self._producer.produce(topic, value, key, on_delivery=callback, headers=headers)
                else:
                    self._producer.produce(
                        topic, value, key, partition, on_delivery=callback, headers=headers
                    )
                break
            except BufferError:  # queue full: let deliveries drain
                self._producer.poll(0.05)
        self._produced[epoch] += 1
        self._sends += 1
        if self._sends & 1023 == 0:
            self._producer.poll(0)  # serve delivery reports now and then between checkpoints

    def barrier(self) -> int:
        """Close the current epoch; :meth:`wait` on the returned value."""
        closed = self._epoch
        self._epoch += 1
        self._produced[self._epoch] = 0
        self._epoch_callback = self._callback(self._epoch, None)
        return closed

    def _pending(self, upto: int) -> int:
        with self._lock:
            delivered = dict(self._delivered)
        return sum(n - delivered.get(e, 0) for e, n in self._produced.items() if e <= upto)

    async def wait(self, upto: int) -> None:
        """Until every record of epochs ``<= upto`` is acknowledged; raises :class:`OutputError`
        if the broker refused one (the event loop keeps running meanwhile)."""
        loop = asyncio.get_running_loop()
        while self._pending(upto) > 0:
            await loop.run_in_executor(self._thread, self._producer.poll, POLL_S)
        for e in [e for e in self._produced if e <= upto]:
            with self._lock:
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
