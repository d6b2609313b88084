"""A confluent-kafka producer for asyncio code: each delivery resolves a future."""

from __future__ import annotations

import asyncio
import threading

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from processors.settings import Settings


class AsyncProducer:
    """confluent-kafka producer whose deliveries resolve asyncio futures (a poll thread)."""

    def __init__(self, settings: Settings) -> None:
        self.producer = Producer(
            {**settings.kafka_common(), "enable.idempotence": True, "linger.ms": 2}
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="webhooks-producer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def produce(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(err: KafkaError | None, _msg: Message) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, err)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits for this answer
                pass

        self.producer.produce(topic, value=value, key=key, on_delivery=settle)
        return future

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.producer.flush(10)


def _resolve(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(KafkaException(err))
