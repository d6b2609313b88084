"""The ``contacts`` topic is compacted on Apache Kafka: old profiles of a user are removed by the
log cleaner, and a dispatcher that starts afterwards still texts the latest profile."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from processors.commands.contacts import import_contacts
from processors.settings import Settings
from tests.integration.test_dispatcher import (
    Bus,
    Reader,
    campaign_doc,
    daytime_zone,
    decision,
    running,
    write_jsonl,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

VERSIONS = 30


def make_compaction_eager(settings: Settings) -> None:
    """Roll segments after 100 ms and clean any dirt at once (defaults: 7 days, 50 %)."""
    admin = AdminClient(settings.kafka_common())
    entries = {
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "100",
        "min.compaction.lag.ms": "0",
    }
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        settings.topic_contacts,
        incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in entries.items()
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=15)


def profiles_on_topic(settings: Settings) -> list[tuple[bytes, bytes | None]]:
    """Every record of ``contacts`` from the log start (one partition at a time, to the end)."""
    consumer = Consumer(
        {**settings.kafka_common(), "group.id": "compaction-reader", "enable.auto.commit": False}
    )
    records: list[tuple[bytes, bytes | None]] = []
    try:
        for p in range(settings.partitions):
            tp = TopicPartition(settings.topic_contacts, p)
            low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            if high <= low:
                continue
            consumer.assign([TopicPartition(settings.topic_contacts, p, low)])
            last = low - 1
            deadline = time.monotonic() + 15
            while last < high - 1 and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is not None and not msg.error():
                    records.append((msg.key(), msg.value()))
                    last = msg.offset()
    finally:
        consumer.close()
    return records


def test_contacts_topic_compacts_and_the_dispatcher_reads_the_latest_profile(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    make_compaction_eager(settings)
    zone = daytime_zone()
    rows = [{"user_id": "u-ana", "phone": f"+1415555{version:04d}", "consent": "opted_in",
             "timezone": zone, "first_name": f"Ana{version}"}
            for version in range(VERSIONS)]  # fmt: skip
    # One record per row, in order: the last row is the profile that must survive.
    assert import_contacts(write_jsonl(tmp_path / "c.jsonl", rows), settings) == (VERSIONS, 0)
    assert len([k for k, _ in profiles_on_topic(settings) if k == b"u-ana"]) == VERSIONS
    time.sleep(0.3)
    latest = VERSIONS - 1
    deadline = time.monotonic() + 60
    while True:
        # A record after segment.ms rolls the segment that holds the versions: it becomes
        # cleanable (the active segment never is).
        other = {"user_id": f"u-other-{time.monotonic_ns()}", "phone": "+14155559999",
                 "consent": "opted_in", "timezone": zone}  # fmt: skip
        import_contacts(write_jsonl(tmp_path / "o.jsonl", [other]), settings)
        ana = [v for k, v in profiles_on_topic(settings) if k == b"u-ana"]
        if len(ana) == 1 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(ana) == 1, f"{len(ana)} profiles of u-ana left after 60 s: no compaction"

    settings = settings.model_copy(update={"clock": "live"})
    reader = Reader(settings, settings.topic_outcomes)
    try:
        with running(settings, campaign_doc()):
            Bus(settings).send(decision("d-ana", "u-ana", int(time.time() * 1000)))
            final = reader.wait_final({"d-ana"}, timeout_s=30)
    finally:
        reader.close()
    assert final["d-ana"].status == "sent", final
    texts = [line for line in settings.outbox_path.read_text().splitlines() if "d-ana" in line]
    assert len(texts) == 1 and f"Hi Ana{latest}," in texts[0]
    assert f"1415555{latest:04d}" in texts[0]
