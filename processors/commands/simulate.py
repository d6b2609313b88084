"""``nudgeflow simulate``: the clickstream of :mod:`processors.simulate` to a file or a topic."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from processors import arguments
from processors.core.events import (
    ClickEvent,
    EventError,
    iso_ms,
    parse_ts,
)
from processors.simulate import START_MS, generate

if TYPE_CHECKING:
    from processors.settings import Settings


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=_positive, required=True, help="number of users")
    parser.add_argument("--events", type=_count, required=True, help="number of events")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--start",
        default=iso_ms(START_MS),
        help="first day, ISO-8601 with a zone (default %(default)s)",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="write canonical JSON Lines to this file ('-' = stdout)")
    target.add_argument("--topic", help="produce Avro to this Kafka topic, keyed by user_id")
    parser.add_argument(
        "--rate", type=arguments.positive_rate, help="with --topic: events per second"
    )
    parser.add_argument(
        "--flush",
        action="store_true",
        help="with --topic: mark end of input on every partition afterwards (event-clock replays)",
    )
    parser.add_argument(
        "--linger-ms",
        type=arguments.linger_ms,
        help="with --topic: producer batching window (default 50 ms, as nudgeflow produce)",
    )


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="simulate", unit="ev", unit_scale=True, file=sys.stderr)


def write_jsonl(stream: Iterator[ClickEvent], fh: TextIO, total: int) -> int:
    """Canonical JSON Lines (ISO ts) with a progress bar; returns the number written."""
    bar = _progress(total)
    written = 0
    dumps = json.dumps
    for event in stream:
        fh.write(dumps(event.to_json()) + "\n")
        written += 1
        if not written % 1000:
            bar.update(1000)
    bar.update(written % 1000)
    bar.close()
    return written


def produce_stream(
    settings: Settings,
    stream: Iterator[ClickEvent],
    topic: str,
    total: int,
    *,
    rate: float | None = None,
    flush: bool = False,
    linger_ms: int | None = None,
) -> int:
    """Avro to ``topic`` keyed by user_id (as ``nudgeflow produce``); returns events sent.

    Raises ``RuntimeError`` if the topic is missing or some events were not delivered."""
    from processors.commands.produce import (
        DEFAULT_LINGER_MS,
        make_producer,
        partition_count,
        send_events,
        send_flush,
    )
    from schemas.codec import Codec

    producer = make_producer(settings, DEFAULT_LINGER_MS if linger_ms is None else linger_ms)
    partition_count(producer, topic)  # fail before generating anything if the topic is missing
    codec = Codec(settings.schema_registry_url)
    sent = send_events(
        producer, topic, stream, codec=codec, rate=rate, bar=_progress(total), step=1000
    )
    if flush:
        send_flush(producer, topic)
    return sent


def run(args: argparse.Namespace) -> int:
    def fail(message: str, code: int = 2) -> int:
        print(f"nudgeflow simulate: {message}", file=sys.stderr)
        return code

    if args.out is not None and (args.rate is not None or args.flush or args.linger_ms is not None):
        return fail("--rate, --flush and --linger-ms only apply to --topic")
    try:
        start_ms = parse_ts(args.start)
        stream = generate(args.users, args.events, args.seed, start_ms)
    except (EventError, ValueError) as exc:
        return fail(str(exc))

    if args.topic is not None:
        from confluent_kafka import KafkaException

        from processors.settings import Settings

        try:
            sent = produce_stream(
                Settings.load(),
                stream,
                args.topic,
                args.events,
                rate=args.rate,
                flush=args.flush,
                linger_ms=args.linger_ms,
            )
        except (RuntimeError, KafkaException) as exc:  # missing topic, broker down, undelivered
            return fail(str(exc), 1)
        print(f"produced {sent} events for {args.users} users to {args.topic}")
        return 0

    if args.out == "-":
        write_jsonl(stream, sys.stdout, args.events)
        return 0
    path = Path(args.out)
    try:
        with path.open("w", encoding="utf-8") as fh:
            written = write_jsonl(stream, fh, args.events)
    except OSError as exc:
        return fail(f"{path}: {exc.strerror or exc}")
    print(f"wrote {written} events for {args.users} users to {path}")
    return 0
