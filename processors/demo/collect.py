"""What the demo reads back: decisions and outcomes, up to the dispatcher's end-of-input mark."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import cast

from processors.core.decision import Decision, DecisionCancelled
from processors.kafka.control import is_control
from processors.settings import Settings
from processors.topic_reader import record_headers


@dataclass
class Collected:
    decisions: dict[str, Decision] = field(default_factory=dict)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    outcomes: list[dict[str, object]] = field(default_factory=list)
    outcome_flushes: set[int] = field(default_factory=set)


def collect(
    settings: Settings,
    deadline: float,
    procs: list[subprocess.Popen[bytes]],
    progress: bool = False,
) -> Collected:
    """Read decisions and outcomes until the dispatcher marks end of input on every partition."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from tqdm import tqdm

    from schemas.codec import Codec

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer({**settings.kafka_common(), "group.id": "nudgeflow-demo-reader",
                         "enable.auto.commit": False})  # fmt: skip
    topics = [settings.topic_decisions, settings.topic_outcomes]
    assignment = []
    partitions: dict[str, int] = {}
    for t in topics:
        meta = consumer.list_topics(t, timeout=10).topics[t]
        partitions[t] = len(meta.partitions)
        assignment += [TopicPartition(t, p, OFFSET_BEGINNING) for p in meta.partitions]
    consumer.assign(assignment)
    got = Collected()
    bar = tqdm(desc="3/5 worker + dispatcher", unit="outcome", disable=not progress)
    try:
        while len(got.outcome_flushes) < partitions[settings.topic_outcomes]:
            if time.monotonic() > deadline:
                raise TimeoutError("the pipeline did not finish in time")
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a pipeline process exited early (code {p.returncode})")
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error():
                    continue
                if is_control(record_headers(msg)):
                    if msg.topic() == settings.topic_outcomes:
                        got.outcome_flushes.add(cast(int, msg.partition()))  # set on a record
                    continue
                name, rec = codec.decode(msg.value())
                if name == "TriggerDecision":
                    d = Decision.from_record(rec)
                    got.decisions[d.decision_id] = d
                elif name == "DecisionCancelled":
                    c = DecisionCancelled.from_record(rec)
                    if c.reason == "reordered":
                        got.decisions.pop(c.decision_id, None)
                    else:
                        got.cancellations.append(c)
                elif name == "SmsOutcome":
                    got.outcomes.append(rec)
                    bar.update(1)
    finally:
        bar.close()
        consumer.close()
    return got
