"""A worker SIGKILLed mid-replay and restarted loses no episode: its decisions still equal
``nudgeflow backtest`` on the same input (real tansu broker, Faust changelog recovery)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from processors.backtest import run_backtest
from processors.control import FlushTracker, is_control
from processors.core.campaign import load_campaigns
from processors.core.decision import Decision
from processors.demo import EXAMPLES
from processors.produce import send_flush
from processors.settings import Settings
from processors.simulate import generate
from schemas.codec import Codec
from tests.test_streams_smoke import WorkerProcess, worker_env

pytestmark = pytest.mark.integration


def _produce(settings: Settings, codec: Codec, events: list) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 5})
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
    campaigns_file = EXAMPLES / "campaigns.yaml"
    events = list(generate(users=500, events=6_000, seed=5))
    codec = Codec(settings.schema_registry_url)
    env = worker_env(settings)
    first = WorkerProcess(env, campaigns_file, "event", tmp_path / "w1.log")
    try:
        _produce(settings, codec, events[:3_000])
        # Let the first worker process part of the input and write state, then kill it hard.
        changelog = f"{settings.worker_id}-user_state-changelog"
        probe = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "t-probe"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            first.assert_alive()
            md = probe.list_topics(changelog, timeout=5).topics.get(changelog)
            if md is not None and md.partitions and md.error is None:
                highs = [
                    probe.get_watermark_offsets(TopicPartition(changelog, p), timeout=5)[1]
                    for p in md.partitions
                ]
                if sum(highs) > 500:
                    break
            time.sleep(0.3)
        probe.close()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        _produce(settings, codec, events[3_000:])
        second = WorkerProcess(env, campaigns_file, "event", tmp_path / "w2.log")
        try:
            send_flush(
                Producer({"bootstrap.servers": settings.bootstrap_servers}),
                settings.topic_clickstream,
            )
            live = _collect(settings, codec, second.assert_alive)
        finally:
            second.stop()
    finally:
        if first.proc.poll() is None:
            first.stop()
    expected = {
        (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
        for d in run_backtest(events, load_campaigns(campaigns_file)).decisions
    }
    assert len(expected) > 100
    assert live == expected
