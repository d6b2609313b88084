"""The worker's producer: what a barrier waits for has landed, in order per partition; a record
refused at once raises from the send, one the broker refuses stops the wait
(:class:`OutputError`)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from processors.settings import Settings
from streams.output import Output, OutputError


@pytest.fixture
def output(settings: Settings) -> Iterator[Output]:
    out = Output(settings, client_id="test-output")
    yield out
    out.flush_sync(10)
    del out
    gc.collect()


def _read(settings: Settings, topic: str, partition: int, n: int) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": f"test-output-{topic}",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, partition, 0)])
        got: list[tuple[bytes, bytes]] = []
        for _ in range(60):
            for msg in consumer.consume(1000, timeout=1.0):
                assert msg.error() is None
                got.append((msg.key(), msg.value()))
            if len(got) >= n:
                break
        return got
    finally:
        consumer.close()


def test_a_barrier_waits_for_records_sent_one_by_one_and_in_chunks(
    settings: Settings, output: Output
) -> None:
    topic = settings.topic_decisions
    records = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(1_500)]

    async def run() -> None:
        output.send(topic, b"first", b"k", partition=0)
        for start in range(0, len(records), 256):
            output.send_many(topic, 0, records[start : start + 256])
        barrier = output.barrier()
        output.send(topic, b"after the barrier", b"k", partition=0)
        await output.wait(barrier)
        assert output._pending(barrier) == 0
        await output.flush()

    asyncio.run(run())
    got = _read(settings, topic, 0, len(records) + 2)
    assert got == [(b"k", b"first"), *records, (b"k", b"after the barrier")]


def test_a_record_refused_at_once_raises_and_what_was_queued_is_still_waited_for(
    settings: Settings, output: Output
) -> None:
    topic = settings.topic_decisions

    async def run() -> None:
        output.send(topic, b"ok", b"k", partition=0)
        await output.flush()
        with pytest.raises(KafkaException):  # librdkafka refuses it at once: too large
            output.send_many(topic, 0, [(b"k", b"fits"), (b"k", b"x" * 2_000_000)])
        await output.flush()  # the one queued before it is counted and waited for

    asyncio.run(run())
    assert _read(settings, topic, 0, 2) == [(b"k", b"ok"), (b"k", b"fits")]


def test_a_record_the_broker_refuses_fails_the_wait(settings: Settings, output: Output) -> None:
    topic = f"{settings.topic_decisions}-small"
    admin = AdminClient(settings.kafka_common())
    new = NewTopic(topic, 1, 1, config={"max.message.bytes": "1000"})
    admin.create_topics([new])[topic].result(timeout=30)

    async def run() -> None:
        output.send_many(topic, 0, [(b"k", b"fits")])
        await output.flush()
        output.send_many(topic, 0, [(b"k", b"x" * 5_000)])  # the broker refuses the batch
        with pytest.raises(OutputError, match="on topic"):
            await output.flush()

    asyncio.run(run())
