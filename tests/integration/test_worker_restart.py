"""A worker SIGKILLed mid-replay and restarted loses no episode: its decisions still equal
``nudgeflow backtest`` on the same input (real Apache Kafka broker, Faust changelog recovery)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from processors.commands.backtest import run_backtest
from processors.commands.produce import send_flush
from processors.core.campaign import load_campaigns
from processors.core.decision import Decision
from processors.demo.run import EXAMPLES
from processors.kafka.control import FlushTracker, is_control
from processors.settings import Settings
from processors.simulate import generate
from schemas.codec import Codec
from streams.state.checkpoint import is_position_key
from tests.integration.test_streams_smoke import TopicReader, WorkerProcess, worker_env

pytestmark = pytest.mark.integration


PACED_MAX = 4_000


def _produce(producer: Producer, codec: Codec, settings: Settings, events: list) -> None:
    for e in events:
        producer.produce(
            settings.topic_clickstream,
            key=e.user_id.encode(),
            value=codec.encode("ClickEvent", e.to_record()),
        )
        producer.poll(0)
    assert producer.flush(30) == 0


def _collect(settings: Settings, codec: Codec, alive: Callable[[], None]) -> set[tuple]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "t-read"})
    consumer.assign(
        [
            TopicPartition(settings.topic_decisions, p, OFFSET_BEGINNING)
            for p in range(settings.partitions)
        ]
    )
    tracker = FlushTracker(partitions=set(range(settings.partitions)))
    withdrawn: set[str] = set()
    decided: dict[str, Decision] = {}
    deadline = time.monotonic() + 120
    try:
        while not tracker.all_complete():
            assert time.monotonic() < deadline, "decisions did not complete in time"
            alive()
            for m in consumer.consume(500, timeout=0.5):
                if m.error():
                    continue
                if is_control(m.headers()):
                    tracker.observe(m.partition(), m.headers())
                    continue
                name, rec = codec.decode(m.value())
                if name == "TriggerDecision":
                    decided[rec["decision_id"]] = Decision.from_record(rec)
                elif rec["reason"] == "reordered":
                    withdrawn.add(rec["decision_id"])
    finally:
        consumer.close()
    return {
        (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
        for d in decided.values()
        if d.decision_id not in withdrawn
    }


def test_worker_sigkilled_mid_replay_loses_no_episode(settings: Settings, tmp_path: Path) -> None:
    """The first worker is killed at its first checkpoint while its input is still arriving,
    so the second one resumes from a checkpoint taken mid-stream, with events applied after it
    (and their decisions perhaps sent) but not checkpointed."""
    campaigns_file = EXAMPLES / "campaigns.yaml"
    events = list(generate(users=500, events=6_000, seed=5))
    codec = Codec(settings.schema_registry_url)
    env = worker_env(settings)
    changelog = TopicReader(settings, f"{settings.worker_id}-user_state-changelog")
    first = WorkerProcess(env, campaigns_file, "event", tmp_path / "w1.log")
    try:
        # ~1,000 events/s until the first position record (a checkpoint) is on the changelog;
        # at most PACED_MAX events, so that some input always arrives after the kill.
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 5})
        sent = 0
        deadline = time.monotonic() + 60
        while not any(is_position_key(m.key() or b"") for m in changelog.messages):
            assert time.monotonic() < deadline, "the first worker wrote no checkpoint in 60 s"
            first.assert_alive()
            if sent < PACED_MAX:
                _produce(producer, codec, settings, events[sent : sent + 100])
                sent += 100
            changelog.drain(0.1)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        assert 0 < sent < len(events)
        _produce(producer, codec, settings, events[sent:])
        second = WorkerProcess(env, campaigns_file, "event", tmp_path / "w2.log")
        try:
            send_flush(producer, settings.topic_clickstream)
            live = _collect(settings, codec, second.assert_alive)
        finally:
            second.stop()
    finally:
        changelog.close()
        if first.proc.poll() is None:
            first.stop()
    expected = {
        (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
        for d in run_backtest(events, load_campaigns(campaigns_file)).decisions
    }
    assert len(expected) > 100
    assert live == expected
