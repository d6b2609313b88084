"""``nudgeflow produce FILE``: canonical events from JSON Lines or CSV into the clickstream topic,
Avro in the Schema Registry wire format, keyed by ``user_id`` (the worker relies on that key:
per-user state lives in the partition of the user's key, with no repartition)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from tqdm import tqdm

from processors import arguments
from processors.core.events import ClickEvent
from processors.files import LineErrors, read_events
from processors.kafka.control import flush_headers
from processors.settings import Settings
from schemas.codec import Codec

DEFAULT_LINGER_MS = 5
"""Batching window of the clickstream producers (``produce``, ``simulate --topic``): librdkafka's
own default. With ``--rate`` an event waits at most this long before it is sent."""


def make_producer(settings: Settings, linger_ms: int = DEFAULT_LINGER_MS) -> Producer:
    return Producer(
        {
            **settings.kafka_common(),
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": "lz4",
        }
    )


def partition_count(producer: Producer, topic: str) -> int:
    meta = producer.list_topics(topic, timeout=10)
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise RuntimeError(f"topic {topic!r} does not exist (run `nudgeflow dev up` or create it)")
    return len(info.partitions)


def send_flush(producer: Producer, topic: str) -> int:
    """End of input: one control record per partition, ordered after every event before it."""
    n = partition_count(producer, topic)
    for p in range(n):
        headers: list[tuple[str, str | bytes | None]] = list(flush_headers(p, n))
        producer.produce(topic, value=b"", partition=p, headers=headers)
    producer.flush(30)
    return n


def send_events(
    producer: Producer,
    topic: str,
    events: Iterable[ClickEvent],
    *,
    codec: Codec,
    rate: float | None = None,
    bar: Any = None,
    step: int = 1,
) -> int:
    """Avro to ``topic`` keyed by user_id, at most ``rate`` a second; then waits for every
    delivery and returns the number sent. ``bar`` (tqdm) advances every ``step`` events and is
    closed. Raises ``RuntimeError`` if some events were not delivered."""
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    sent = 0
    started = time.monotonic()
    for event in events:
        value = codec.encode("ClickEvent", event.to_record())
        key = event.user_id.encode()
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: let deliveries drain
        producer.poll(0)
        sent += 1
        if bar is not None and not sent % step:
            bar.update(step)
        if rate:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    if bar is not None:
        if sent % step:
            bar.update(sent % step)
        bar.close()
    remaining = producer.flush(60)
    if remaining or failures:
        raise RuntimeError(f"{remaining + len(failures)} events were not delivered: {failures[:3]}")
    return sent


def produce_file(
    settings: Settings,
    path: Path,
    *,
    topic: str | None = None,
    rate: float | None = None,
    flush: bool = False,
    progress: bool = True,
    linger_ms: int = DEFAULT_LINGER_MS,
    desc: str = "produce",
) -> tuple[int, LineErrors]:
    """Send every good event of ``path``; returns (events sent, bad lines)."""
    topic = topic or settings.topic_clickstream
    producer = make_producer(settings, linger_ms)
    errors = LineErrors(str(path))
    bar = tqdm(desc=desc, unit="ev", disable=not progress, file=sys.stderr)
    sent = send_events(
        producer,
        topic,
        read_events(path, errors),
        codec=Codec(settings.schema_registry_url),
        rate=rate,
        bar=bar,
    )
    if flush:
        send_flush(producer, topic)
    return sent, errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="events as JSON Lines (.jsonl) or CSV (.csv)")
    parser.add_argument("--topic", help="target topic (default: the clickstream topic)")
    parser.add_argument(
        "--rate",
        type=arguments.positive_rate,
        help="events per second (default: as fast as possible)",
    )
    parser.add_argument(
        "--flush",
        action="store_true",
        help="after the file, mark end of input on every partition (event-clock replays)",
    )
    parser.add_argument(
        "--linger-ms",
        type=arguments.linger_ms,
        default=DEFAULT_LINGER_MS,
        help="producer batching window (default %(default)s ms; with --rate an event waits at "
        "most this long)",
    )


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    if not args.file.exists():
        print(f"nudgeflow produce: {args.file}: no such file", file=sys.stderr)
        return 2
    sent, errors = produce_file(
        settings,
        args.file,
        topic=args.topic,
        rate=args.rate,
        flush=args.flush,
        linger_ms=args.linger_ms,
    )
    print(
        f"produced {sent} events to {args.topic or settings.topic_clickstream}; "
        f"skipped {len(errors)} bad lines"
    )
    return 0
