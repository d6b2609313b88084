"""End-to-end smoke tests of the Faust trigger worker on the embedded stack.

The worker runs as a real ``nudgeflow worker`` subprocess (configured through ``NUDGEFLOW_*``
like in production); the test produces Avro click events with the real codec and reads
``sms-decisions``, the DLQ and the state table's changelog with confluent-kafka.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from processors.kafka.control import FlushTracker, is_control
from processors.settings import Settings
from schemas.codec import Codec
from streams.intake import header
from streams.state.timers import (
    PartitionTimers,
    StateFormatError,
    StoredState,
    TimerIndex,
    pack_state,
    unpack_state,
)
from streams.ticks import decode_tick, encode_tick
from streams.topics import CONTROL_HEADER, DLQ_REASON_HEADER, FLUSH

NUDGEFLOW = Path(sys.executable).with_name("nudgeflow")
CAMPAIGNS = """
campaigns:
  - id: cart-recovery
    trigger: {type: absence, start: [add_to_cart], cancel: [purchase], after: 30m}
    message: {template: "Your cart is waiting"}
"""
MINUTE = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def worker_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment of a worker process that uses exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGEFLOW_")}
    fields = {
        name: getattr(settings, name)
        for name in Settings.model_fields
        if name.startswith("topic_")
        or name
        in {
            "profile",
            "state_dir",
            "bootstrap_servers",
            "schema_registry_url",
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "partitions",
            "worker_id",
            "allowed_lateness_s",
        }
    }
    fields["worker_web_port"] = 0
    fields.update(extra)
    env.update({f"NUDGEFLOW_{k.upper()}": str(v) for k, v in fields.items()})
    return env


class WorkerProcess:
    def __init__(self, env: dict[str, str], campaigns: Path, clock: str, log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [str(NUDGEFLOW), "worker", "--campaigns", str(campaigns), "--clock", clock],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds to exit)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = -9
        self._out.close()
        return code, time.monotonic() - t

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()}")


def worker_launcher(tmp_path: Path, campaigns_yaml: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Body of the worker fixtures: ``start(env, clock)`` runs a worker on ``campaigns_yaml``
    with its logs and Faust data directory in ``tmp_path``; every one left running is stopped."""
    started: list[WorkerProcess] = []
    campaigns = tmp_path / "campaigns.yaml"
    campaigns.write_text(campaigns_yaml)

    def start(env: dict[str, str], clock: str) -> WorkerProcess:
        # Faust's data directory (RocksDB, or an empty dir with the memory store) stays in tmp.
        env = {"FAUST_DATADIR": str(tmp_path / "faust-data"), **env}
        w = WorkerProcess(env, campaigns, clock, tmp_path / f"worker{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    yield from worker_launcher(tmp_path, CAMPAIGNS)


def click(event_id: str, user_id: str, event_type: str, ts: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "user_id": user_id,
        "event_type": event_type,
        "ts": ts,
        "session_id": "s1",
        "properties": {},
    }


def produce_clicks(settings: Settings, codec: Codec, records: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for r in records:
        producer.produce(
            settings.topic_clickstream,
            key=r["user_id"].encode(),
            value=codec.encode("ClickEvent", r),
        )
    assert producer.flush(15) == 0


def produce_raw(settings: Settings, key: bytes | None, value: bytes, **kwargs: Any) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    producer.produce(settings.topic_clickstream, key=key, value=value, **kwargs)
    assert producer.flush(15) == 0


def produce_flush(settings: Settings) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for p in range(settings.partitions):
        producer.produce(
            settings.topic_clickstream, value=b"", partition=p, headers=[(CONTROL_HEADER, FLUSH)]
        )
    assert producer.flush(15) == 0


class TopicReader:
    """Reads a whole topic from the beginning, without a consumer group."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.bootstrap_servers,
                "group.id": "unused",
                "enable.auto.commit": False,
            }
        )
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
        self.messages: list[Any] = []

    def read_until(
        self, done: Callable[[list[Any]], bool], timeout: float, check: Callable[[], None]
    ) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not done(self.messages) and time.monotonic() < deadline:
            check()
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.messages.append(msg)
        return self.messages

    def drain(self, seconds: float) -> list[Any]:
        return self.read_until(lambda _: False, seconds, lambda: None)

    def close(self) -> None:
        self.consumer.close()


def decisions_of(codec: Codec, messages: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [codec.decode(m.value()) for m in messages if not is_control(m.headers())]


def test_event_clock_state_survives_restart_and_flush_fires_once(
    settings: Settings, workers: Callable[..., WorkerProcess]
) -> None:
    """Cart abandoned by u-a, converted by u-b; the worker is restarted between the events and
    the flush, so the decision can only come from state recovered from the changelog and a
    timer index rebuilt from the table."""
    codec = Codec(settings.schema_registry_url)
    env = worker_env(settings)
    changelog = TopicReader(settings, f"{settings.worker_id}-user_state-changelog")
    dlq = TopicReader(settings, settings.topic_clickstream_dlq)
    out = TopicReader(settings, settings.topic_decisions)
    try:
        w1 = workers(env, "event")
        produce_clicks(
            settings,
            codec,
            [
                click("e1", "u-a", "add_to_cart", T0),
                click("e2", "u-b", "add_to_cart", T0),
                click("e3", "u-b", "purchase", T0 + 5 * MINUTE),
                click("e2", "u-b", "add_to_cart", T0),  # duplicate: counted, not dead-lettered
                click("e4", "u-a", "page_view", T0 + 10 * MINUTE),
                click("e5", "u-a", "page_view", T0 + 1 * MINUTE),  # behind the watermark: late
            ],
        )
        produce_raw(settings, b"u-x", b"not avro at all")
        misrouted = codec.encode("ClickEvent", click("e6", "u-c", "add_to_cart", T0))
        produce_raw(settings, b"u-other", misrouted)
        produce_raw(settings, b"u-y", b"?", headers=[(CONTROL_HEADER, b"pause")])
        keys = lambda ms: {m.key() for m in ms}  # noqa: E731
        changelog.read_until(lambda ms: {b"u-a", b"u-b"} <= keys(ms), 60, w1.assert_alive)
        first_state_s = time.monotonic() - w1.started
        assert {b"u-a", b"u-b"} <= keys(changelog.messages), "worker never stored the states"
        dead = dlq.read_until(lambda ms: len(ms) >= 4, 20, w1.assert_alive)
        by_reason = {dict(m.headers())[DLQ_REASON_HEADER]: (m.key(), m.value()) for m in dead}
        late = codec.encode("ClickEvent", click("e5", "u-a", "page_view", T0 + 1 * MINUTE))
        assert by_reason == {
            b"not_wire_format": (b"u-x", b"not avro at all"),
            b"key_mismatch": (b"u-other", misrouted),
            b"late": (b"u-a", late),
            b"unknown_control": (b"u-y", b"?"),
        }
        # No timer has fired yet: nothing on sms-decisions before the flush.
        assert out.drain(1.0) == []
        code, stop_s = w1.stop()
        assert code == 0, w1.log.read_text()

        w2 = workers(env, "event")
        produce_flush(settings)
        out.read_until(lambda ms: len(ms) >= 1, 60, w2.assert_alive)
        decision_s = time.monotonic() - w2.started
        out.drain(3.0)  # anything extra (a second decision) would show up here
        records = decisions_of(codec, out.messages)
        triggers = [r for name, r in records if name == "TriggerDecision"]
        assert len(triggers) == 1, records
        (d,) = triggers
        assert (d["user_id"], d["campaign_id"]) == ("u-a", "cart-recovery")
        assert d["fire_at"] == T0 + 30 * MINUTE
        assert d["trigger_event_ids"] == ["e1"]
        assert d["clock"] == "event"
        trigger_keys = [
            m.key()
            for m in out.messages
            if not is_control(m.headers()) and codec.decode(m.value())[0] == "TriggerDecision"
        ]
        assert trigger_keys == [b"u-a"]
        # End of input was forwarded to every send-topic partition, after the decisions.
        tracker = FlushTracker(partitions=set(range(settings.partitions)))
        for m in out.drain(1.0):
            tracker.observe(m.partition(), m.headers())
        assert tracker.all_complete()
        assert len(dlq.drain(0.5)) == 4  # the duplicate was not dead-lettered
        code, _ = w2.stop()
        assert code == 0, w2.log.read_text()
        print(
            f"\nworker: first state stored {first_state_s:.1f}s after start, stop {stop_s:.1f}s,"
            f" decision {decision_s:.1f}s after restart"
        )
    finally:
        for reader in (changelog, dlq, out):
            reader.close()


def test_live_clock_tick_fires_abandoned_cart(
    settings: Settings, workers: Callable[..., WorkerProcess]
) -> None:
    """With the live clock, wall-clock ticks fire a deadline that no event of the user passes;
    a cart added just now stays silent."""
    codec = Codec(settings.schema_registry_url)
    env = worker_env(settings, allowed_lateness_s=1)
    out = TopicReader(settings, settings.topic_decisions)
    try:
        w = workers(env, "live")
        now = int(time.time() * 1000)
        produce_clicks(
            settings,
            codec,
            [
                click("e1", "u-old", "add_to_cart", now - 31 * MINUTE),
                click("e2", "u-new", "add_to_cart", now),
            ],
        )
        out.read_until(lambda ms: len(ms) >= 1, 60, w.assert_alive)
        fired_s = time.monotonic() - w.started
        out.drain(2.5)  # a few more ticks: u-new must stay silent, u-old must not fire twice
        records = decisions_of(codec, out.messages)
        assert [(n, r["user_id"]) for n, r in records] == [("TriggerDecision", "u-old")]
        d = records[0][1]
        assert d["fire_at"] == now - 31 * MINUTE + 30 * MINUTE
        assert d["clock"] == "live"
        assert d["decided_at"] is not None and d["decided_at"] >= now
        code, _ = w.stop()
        assert code == 0, w.log.read_text()
        print(f"\nlive worker: tick fired the decision {fired_s:.1f}s after start")
    finally:
        out.close()


ASSIGNED = re.compile(r"nudgeflow\.worker: assigned partitions \[([\d, ]*)\]$", re.M)


def assignments(w: WorkerProcess) -> list[set[int]]:
    """The partition sets a worker reported, in order."""
    text = w.log.read_text(errors="replace")
    return [{int(p) for p in m.split(",") if p.strip()} for m in ASSIGNED.findall(text)]


def wait_for(cond: Callable[[], bool], what: str, timeout: float, *alive: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for w in alive:
            w.assert_alive()
        if time.monotonic() > deadline:
            logs = "\n".join(w.log.read_text(errors="replace") for w in alive)
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{logs}")
        time.sleep(0.2)


def test_worker_reports_its_start_and_each_assignment_change_at_the_default_level(
    settings: Settings, workers: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """``nudgeflow worker`` at the default log level: one start line (group, topics, campaigns,
    clock), one line per change of its partitions (a second worker joining splits them), and
    nothing per event: no user id, event id or text of the events it processed."""
    codec = Codec(settings.schema_registry_url)
    env = worker_env(settings)
    assert "NUDGEFLOW_LOG_LEVEL" not in env
    every = set(range(settings.partitions))
    changelog = TopicReader(settings, f"{settings.worker_id}-user_state-changelog")
    try:
        w1 = workers({**env, "FAUST_DATADIR": str(tmp_path / "w1-data")}, "event")
        wait_for(lambda: assignments(w1) == [every], "the first assignment", 60, w1)
        produce_clicks(
            settings,
            codec,
            [click(f"ev-{n}", f"user-{n}", "add_to_cart", T0 + n) for n in range(8)],
        )
        wanted = {f"user-{n}".encode() for n in range(8)}
        changelog.read_until(lambda ms: wanted <= {m.key() for m in ms}, 60, w1.assert_alive)

        w2 = workers({**env, "FAUST_DATADIR": str(tmp_path / "w2-data")}, "event")

        def split() -> bool:
            a, b = assignments(w1), assignments(w2)
            return len(a) == 2 and len(b) == 1 and a[1] | b[0] == every and not a[1] & b[0]

        wait_for(split, "the partitions to be split between the workers", 90, w1, w2)
        assert all(assignments(w1)[1]) and assignments(w2)[0]  # each kept some partitions
        for w in (w2, w1):
            code, _ = w.stop()
            assert code == 0, w.log.read_text()
    finally:
        changelog.close()

    for w in (w1, w2):
        text = w.log.read_text(errors="replace")
        starts = re.findall(r"nudgeflow\.worker: worker (.*)$", text, re.M)
        assert starts == [
            f"{settings.worker_id} (consumer group {settings.worker_id}): clickstream "
            f"{settings.topic_clickstream} ({settings.partitions} partitions) -> "
            f"{settings.topic_decisions}, dead letters {settings.topic_clickstream_dlq}, ticks "
            f"{settings.topic_ticks}; campaigns loaded: 1 enabled; clock event"
        ]
        assert len(text.splitlines()) < 10, text  # a few lines, not one per event
        for needle in ("user-", "ev-", "Your cart is waiting"):
            assert needle not in text


# ---------------------------------------------------------------- pure helpers (no broker)


@pytest.mark.parametrize("ordered", [True, False])
def test_partition_timers_pop_due_skips_moved_and_dropped_deadlines(ordered: bool) -> None:
    t = PartitionTimers(ordered)  # unordered (event clock): no heap, same answers
    t.push(300, "a")
    t.push(100, "b")
    t.push(200, "c")
    t.push(500, "a")  # a's deadline moved later: the 300 entry is stale
    t.discard("c")
    assert t.all_users() == ["b", "a"]
    assert t.pop_due(400) == ["b"]
    assert t.pop_due(400) == []
    assert t.next_wake() == 500
    assert t.pop_due(500) == ["a"]
    assert len(t) == 0


def test_timer_index_rebuilds_from_table_entries_once_per_rebalance() -> None:
    table = {
        "a": unpack_state(pack_state(1, 50, b"{}")),
        "b": unpack_state(pack_state(2, 70, b"{}")),
        "c": unpack_state(pack_state(1, None, b"{}")),
    }
    scans: list[int] = []

    def scan() -> list[tuple[str, StoredState]]:
        scans.append(1)
        return list(table.items())

    index = TimerIndex(scan)
    assert index.partition(1).all_users() == ["a"]
    assert index.partition(2).pop_due(100) == ["b"]
    assert index.partition(3).all_users() == []
    assert len(scans) == 1
    index.clear()
    assert index.partition(2).all_users() == ["b"]  # rebuilt from the table
    assert len(scans) == 2


def test_state_envelope_round_trip_and_errors() -> None:
    stored = unpack_state(pack_state(3, 1_700_000_000_000, b"state"))
    assert stored == StoredState(3, 1_700_000_000_000, b"state")
    assert unpack_state(pack_state(0, None, b"")).wake_at is None
    with pytest.raises(StateFormatError, match="shorter"):
        unpack_state(b"\x01")
    with pytest.raises(StateFormatError, match="version 9"):
        unpack_state(b"\x09" + pack_state(0, None, b"")[1:])


def test_tick_and_header_helpers() -> None:
    assert decode_tick(encode_tick(1_700_000_000_123)) == 1_700_000_000_123
    assert decode_tick(b"1700000000000") == 1_700_000_000_000
    with pytest.raises(ValueError):
        decode_tick(b"soon")
    assert header((("a", b"1"), (CONTROL_HEADER, FLUSH)), CONTROL_HEADER) == FLUSH
    assert header((), CONTROL_HEADER) is None
    assert header({CONTROL_HEADER: b"x"}, CONTROL_HEADER) == b"x"
