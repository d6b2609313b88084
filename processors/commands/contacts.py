"""``nudgeflow contacts import FILE``: contact profiles into the compacted ``contacts`` topic.

JSON Lines or CSV with the same columns (``user_id``, ``phone``, ``consent``, ``timezone``,
``first_name``, ``locale``; other columns become attributes). Each row is validated by
:func:`processors.core.contact.parse_contact_row`; a bad row is reported with its line number and
reason (never the phone number) and skipped, the rest still flows. Profiles are Avro
``ContactProfile`` records keyed by ``user_id``; the dispatcher materializes the topic in Redis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from processors.core.contact import Contact, parse_contact_row
from processors.files import LineErrors, read_parsed
from processors.settings import Settings
from schemas.codec import Codec


def read_contacts(path: Path, errors: LineErrors) -> list[Contact]:
    """Every valid contact of the file (later rows for a user win); bad rows go to ``errors``."""
    return [contact for _line, contact in read_parsed(path, parse_contact_row, errors)]


def import_contacts(
    path: Path, settings: Settings, *, progress: bool = False, echo_errors: bool = True
) -> tuple[int, int]:
    """Publish the contacts of ``path``; returns ``(published, rows skipped)``.

    Raises ``FileNotFoundError`` for a missing file and ``RuntimeError`` when the broker does
    not acknowledge every record.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"contacts file {path}: not found")
    codec = Codec(settings.schema_registry_url)
    producer = Producer({**settings.kafka_common(), "enable.idempotence": True, "linger.ms": 5})
    errors = LineErrors(
        str(path), echo=(lambda m: print(m, file=sys.stderr)) if echo_errors else None
    )
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err.str())

    published = 0
    bar = tqdm(desc="contacts", unit="contact", disable=not progress, file=sys.stderr)
    try:
        for _line, contact in read_parsed(path, parse_contact_row, errors):
            value = codec.encode("ContactProfile", contact.to_record())
            while True:
                try:
                    producer.produce(
                        settings.topic_contacts,
                        key=contact.user_id.encode(),
                        value=value,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            published += 1
            bar.update(1)
        remaining = producer.flush(30)
    finally:
        bar.close()
    if remaining or failures:
        raise RuntimeError(
            f"{remaining + len(failures)} contact(s) were not acknowledged by the broker"
            + (f": {failures[0]}" if failures else "")
        )
    return published, len(errors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="publish contact profiles from a JSON Lines or CSV file")
    imp.add_argument("file", type=Path, help="contacts as JSON Lines (.jsonl) or CSV (.csv)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    try:
        published, skipped = import_contacts(args.file, settings, progress=not args.no_progress)
    except FileNotFoundError as exc:
        print(f"nudgeflow contacts: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"nudgeflow contacts: {exc}", file=sys.stderr)
        return 1
    print(
        f"imported {published} contacts into {settings.topic_contacts}; "
        f"skipped {skipped} invalid row(s)"
    )
    return 0
