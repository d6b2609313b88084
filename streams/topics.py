"""The Kafka topics of the trigger worker, all raw bytes.

Values are Confluent wire-format Avro handled by :mod:`schemas.codec` (never by Faust codecs),
keys are UTF-8 user ids. Raw serializers keep Faust from JSON-decoding anything: a record that
does not decode must reach the dead-letter topic byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TopicT

from processors.kafka.control import CONTROL_HEADER, FLUSH  # noqa: F401  (re-exported)
from processors.kafka.headers import DLQ_REASON_HEADER  # noqa: F401  (re-exported)
from processors.settings import Settings

DLQ_DETAIL_HEADER = "nudgeflow-dlq-detail"
"""Human-readable explanation (no field values that could be personal data)."""


@dataclass(frozen=True, slots=True)
class Topics:
    clickstream: TopicT
    clickstream_dlq: TopicT
    decisions: TopicT
    ticks: TopicT
    """Live-clock ticks, co-partitioned with ``clickstream``: the tick on partition p moves time
    for the users of clickstream partition p."""


def _raw_topic(app: faust.App, name: str, partitions: int) -> TopicT:
    return app.topic(
        name,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )


def make_topics(app: faust.App, settings: Settings) -> Topics:
    """Topic objects named by ``settings`` (tests give every topic a unique suffix)."""
    n = settings.partitions
    return Topics(
        clickstream=_raw_topic(app, settings.topic_clickstream, n),
        clickstream_dlq=_raw_topic(app, settings.topic_clickstream_dlq, n),
        decisions=_raw_topic(app, settings.topic_decisions, n),
        ticks=_raw_topic(app, settings.topic_ticks, n),
    )
