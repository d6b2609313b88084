"""A worker the group expired while it was frozen (longer than the session timeout) comes back
holding changes it never wrote. Another worker owns its partition by then and restored it from
the last checkpoint; the returning worker must write none of those changes, or a stale user
state lands after the new owner's position records and the next restore resumes *ahead* of
what that state has seen (the wrong decision `make chaos` once found). Real Apache Kafka, real
worker processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from processors.commands.backtest import run_backtest
from processors.commands.produce import send_flush
from processors.core.campaign import load_campaigns
from processors.core.events import ClickEvent
from processors.devstack import StackInfo
from processors.settings import Settings
from schemas.codec import Codec
from streams.state.checkpoint import decode_position, is_position_key
from tests.conftest import delete_topics, isolated_settings
from tests.integration.test_streams_smoke import (
    MINUTE,
    T0,
    TopicReader,
    WorkerProcess,
    click,
    worker_env,
    worker_launcher,
)
from tests.integration.test_worker_restart import _collect

pytestmark = pytest.mark.integration

CAMPAIGNS = """
campaigns:
  - id: booking-incomplete
    trigger: {type: absence, start: [booking_start], cancel: [booking_complete], after: 15m}
    message: {template: "Your booking is not confirmed yet"}
  - id: signup-confirm
    trigger: {type: event, event: event_signup, delay: 0s}
    message: {template: "You are signed up"}
"""
NEVER_MS = 600_000  # a checkpoint interval the test never reaches
BACKLOG = 30_000  # more than A can read between its return and its revoke


@pytest.fixture
def one_partition(stack: StackInfo, tmp_path: Path) -> Iterator[Settings]:
    result = isolated_settings(stack, outbox_path=tmp_path / "outbox.jsonl", partitions=1)
    yield result
    delete_topics(stack.bootstrap_servers, result.topic_clickstream.rsplit("-", 1)[1])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    yield from worker_launcher(tmp_path, CAMPAIGNS)


def test_a_worker_expired_by_the_group_writes_nothing_when_it_returns(
    one_partition: Settings, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    settings = one_partition
    codec = Codec(settings.schema_registry_url)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "linger.ms": 5})
    sent: list[dict[str, object]] = []

    def produce(records: list[dict[str, object]]) -> None:
        for r in records:
            producer.produce(
                settings.topic_clickstream,
                key=str(r["user_id"]).encode(),
                value=codec.encode("ClickEvent", r),
            )
            producer.poll(0)
            sent.append(r)
        assert producer.flush(30) == 0

    decisions = TopicReader(settings, settings.topic_decisions)
    changelog = TopicReader(settings, f"{settings.worker_id}-user_state-changelog")
    stop_filler = threading.Event()
    filler: threading.Thread | None = None
    try:
        # A holds the booking start in memory only (its checkpoint interval is never reached).
        a = workers(worker_env(settings, worker_checkpoint_interval_ms=NEVER_MS), "event")
        produce(
            [
                click("u-b1", "u", "booking_start", T0),
                click("u-s1", "u", "event_signup", T0 + 1),  # decided at once: A has read both
            ]
        )
        decisions.read_until(lambda ms: len(ms) >= 1, 90, a.assert_alive)
        assert decisions.messages, "the first worker made no decision"
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            # While A is frozen: a backlog of other users' clicks, then u completes the booking.
            # B takes the partition once the group expires A, replays it from the beginning and
            # checkpoints past the completion. A, when it returns, is still far behind: its u
            # has not seen the completion.
            produce(
                [
                    click(f"f-{i}", f"f{i % 500}", "page_view", T0 + MINUTE + i)
                    for i in range(BACKLOG)
                ]
            )
            produce([click("u-b2", "u", "booking_complete", T0 + 7 * MINUTE)])
            completion = len(sent) - 1  # its offset: one partition, produced in order
            b = workers(worker_env(settings), "event")

            def past_completion(ms: list[Any]) -> bool:
                return any(
                    is_position_key(m.key() or b"")
                    and (decode_position(m.value()) or 0) > completion
                    for m in ms
                )

            changelog.read_until(past_completion, 120, b.assert_alive)
            assert past_completion(changelog.messages), "B did not checkpoint past the completion"

            # Other users keep B's buffer busy, so B's checkpoint at the coming rebalance writes
            # a position (after anything A might write).
            def fill() -> None:
                i = 0
                while not stop_filler.is_set():
                    produce([click(f"g-{i}", f"f{i % 50}", "page_view", T0 + 8 * MINUTE + i)])
                    i += 1
                    time.sleep(0.02)

            filler = threading.Thread(target=fill, daemon=True)
            filler.start()
            time.sleep(2.0)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # A learns that it was expired, rejoins, and the group rebalances between A and B.
        time.sleep(15.0)
        stop_filler.set()
        filler.join(10)
        a.assert_alive()
        b.assert_alive()
        produce([click("f-end", "f0", "page_view", T0 + 60 * MINUTE)])
        send_flush(producer, settings.topic_clickstream)

        def alive() -> None:
            a.assert_alive()
            b.assert_alive()

        live = _collect(settings, codec, alive)
    finally:
        stop_filler.set()
        if filler is not None:
            filler.join(10)
        decisions.close()
        changelog.close()
    expected = {
        (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
        for d in run_backtest(
            [ClickEvent.from_record(r) for r in sent], load_campaigns(tmp_path / "campaigns.yaml")
        ).decisions
    }
    assert ("signup-confirm", "u") in {(c, u) for _, c, u, _ in expected}
    assert not any(c == "booking-incomplete" for _, c, _, _ in expected)
    assert live == expected
