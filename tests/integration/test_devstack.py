"""The embedded dev stack: real Apache Kafka, real redis-server, real confluent-kafka clients."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from processors.devstack import (
    EmbeddedStack,
    StackError,
    StackInfo,
    broker_healthy,
    create_topics,
    embedded_stack,
    redis_healthy,
    topic_specs,
)
from processors.devstack.broker import kafka_version
from processors.devstack.processes import free_ports
from processors.redis.client import connect, is_cluster
from processors.settings import REPO_ROOT, Settings

pytestmark = pytest.mark.integration


def _running(pid: int) -> bool:
    """Alive and not a zombie (orphans may linger as zombies where pid 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def other_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """An unrelated redis-server that ``down`` must never touch."""
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port)]
        + ["--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_healthy(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_up_starts_both_and_records_them(tmp_path: Path) -> None:
    stack = EmbeddedStack()
    t0 = time.monotonic()
    info = stack.up(tmp_path)
    took = time.monotonic() - t0
    try:
        print(f"\nembedded stack up in {took:.2f} s")
        assert took < 20
        assert redis.Redis.from_url(info.redis_url).ping()
        md = AdminClient({"bootstrap.servers": info.bootstrap_servers}).list_topics(timeout=5)
        assert md.brokers
        assert info.bootstrap_servers.startswith("127.0.0.1:")
        assert info.redis_url.startswith("redis://127.0.0.1:") and info.redis_url.endswith("/0")

        state = json.loads((tmp_path / "stack.json").read_text())
        assert state["bootstrap_servers"] == info.bootstrap_servers
        assert state["redis_url"] == info.redis_url
        assert state["broker_pid"] == info.broker_pid != state["redis_pid"] == info.redis_pid
        assert abs(state["started_at"] - time.time()) < 60
        assert (tmp_path / "kafka.log").exists() and (tmp_path / "redis.log").exists()
        assert "Kafka Server started" in (tmp_path / "kafka.log").read_text()
        assert state["broker_version"] == f"Apache Kafka {kafka_version()}"
        # Each child leads its own session, so a terminal's Ctrl-C does not reach it.
        assert os.getsid(info.broker_pid) == info.broker_pid
        assert os.getsid(info.redis_pid) == info.redis_pid

        status = stack.status(tmp_path)
        assert status is not None and status.healthy
        assert (status.bootstrap_servers, status.redis_url) == (
            info.bootstrap_servers,
            info.redis_url,
        )

        # The dev profile picks the addresses up from the state file.
        dev = Settings.load(profile="dev", state_dir=tmp_path)
        assert (dev.bootstrap_servers, dev.redis_url) == (info.bootstrap_servers, info.redis_url)

        again = EmbeddedStack().up(tmp_path)
        assert again.reused
        assert (again.broker_pid, again.redis_pid) == (info.broker_pid, info.redis_pid)
    finally:
        assert stack.down(tmp_path)
    assert not _running(info.broker_pid) and not _running(info.redis_pid)
    assert not (tmp_path / "stack.json").exists()
    assert stack.status(tmp_path) is None
    assert not broker_healthy(info.bootstrap_servers)
    assert not redis_healthy(info.redis_url)
    assert stack.down(tmp_path) is False


def test_up_replaces_a_stack_that_died(tmp_path: Path) -> None:
    stack = EmbeddedStack()
    first = stack.up(tmp_path)
    try:
        os.kill(first.redis_pid, 9)
        deadline = time.monotonic() + 5
        while redis_healthy(first.redis_url) and time.monotonic() < deadline:
            time.sleep(0.05)
        status = stack.status(tmp_path)
        assert status is not None and status.broker_healthy and not status.redis_healthy
        second = stack.up(tmp_path)
        assert not second.reused and second.healthy
        assert second.broker_pid != first.broker_pid
        assert not _running(first.broker_pid)
    finally:
        stack.down(tmp_path)


def test_topic_round_trip_with_fast_group_join(settings: Settings) -> None:
    topic = settings.topic_clickstream
    producer = Producer(settings.kafka_common())
    producer.produce(topic, key=b"user-1", value=b"hello", headers=[("h", b"v")])
    assert producer.flush(10) == 0

    conf = settings.consumer_conf(f"roundtrip-{uuid.uuid4().hex[:8]}")
    assert conf["session.timeout.ms"] == 6000 and conf["heartbeat.interval.ms"] == 1000
    consumer = Consumer(conf)
    t0 = time.monotonic()
    consumer.subscribe([topic])
    msg = None
    try:
        while msg is None and time.monotonic() - t0 < 30:
            candidate = consumer.poll(0.5)
            if candidate is not None:
                assert candidate.error() is None, candidate.error()
                msg = candidate
        joined = time.monotonic() - t0
        print(f"\nconsumer group join + first message: {joined:.2f} s")
        assert msg is not None, "no message within 30 s"
        assert (msg.key(), msg.value(), msg.headers()) == (b"user-1", b"hello", [("h", b"v")])
        consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()


def test_create_topics_is_idempotent_with_partitions_and_compaction(settings: Settings) -> None:
    assert create_topics(settings.bootstrap_servers, settings) == []
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    md = admin.list_topics(timeout=5)
    for name in topic_specs(settings):
        assert len(md.topics[name].partitions) == settings.partitions == 4
    (future,) = admin.describe_configs([ConfigResource("topic", settings.topic_contacts)]).values()
    assert future.result(timeout=10)["cleanup.policy"].value == "compact"


def test_settings_fixture_isolates_tests(settings: Settings, stack: StackInfo) -> None:
    assert settings.topic_clickstream != "clickstream"
    assert settings.topic_clickstream.startswith("clickstream-")
    assert settings.bootstrap_servers == stack.bootstrap_servers
    assert settings.redis_url == stack.redis_url
    assert settings.gateway == "outbox" and settings.schema_registry_url.startswith("mock://")


def test_redis_client_starts_empty(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set("k", "v")


def test_redis_client_is_flushed_between_tests(redis_client: redis.Redis) -> None:
    assert redis_client.get("k") is None


def test_down_stops_only_its_own_processes(
    tmp_path: Path, other_redis: tuple[subprocess.Popen[bytes], str]
) -> None:
    other, other_url = other_redis
    assert redis_healthy(other_url)
    stack = EmbeddedStack()
    info = stack.up(tmp_path / "state")
    assert stack.down(tmp_path / "state")
    assert not _running(info.broker_pid) and not _running(info.redis_pid)
    assert other.poll() is None and redis_healthy(other_url)


def test_down_ignores_recorded_pids_that_are_not_ours_any_more(
    tmp_path: Path, other_redis: tuple[subprocess.Popen[bytes], str]
) -> None:
    """A stale stack.json whose pids now belong to other processes must not kill them."""
    other, other_url = other_redis
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        state = {
            "bootstrap_servers": "127.0.0.1:1",
            "redis_url": "redis://127.0.0.1:1/0",
            # same executable as the unrelated redis, but it started at another time
            "redis_pid": other.pid,
            "redis_bin": os.path.realpath(shutil.which("redis-server") or ""),
            "redis_start": 1,
            # a different executable
            "broker_pid": sleeper.pid,
            "broker_bin": str(Path(sys.executable).resolve()),
            "started_at": time.time(),
        }
        (tmp_path / "stack.json").write_text(json.dumps(state))
        stack = EmbeddedStack()
        status = stack.status(tmp_path)
        assert status is not None and not status.broker_healthy and not status.redis_healthy
        assert stack.down(tmp_path)
        assert not (tmp_path / "stack.json").exists()
        assert sleeper.poll() is None and other.poll() is None and redis_healthy(other_url)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_missing_redis_server_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError, match=r"apt-get install -y redis-server"):
        EmbeddedStack().up(tmp_path / "state")
    assert not (tmp_path / "state" / "stack.json").exists()


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _fake_java(home: Path, body: str) -> str:
    """A JAVA_HOME whose ``java`` formats storage with the real one and runs ``body`` otherwise."""
    real = shutil.which("java")
    assert real is not None
    (home / "bin").mkdir(parents=True)
    script = f'case "$*" in *StorageTool*) exec {real} "$@";; esac\n{body}'
    _script(home / "bin" / "java", script)
    return str(home)


def test_broker_that_dies_gives_its_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JAVA_HOME", _fake_java(tmp_path / "jdk", "echo kaputt-123; exit 3"))
    with pytest.raises(StackError, match=r"(?s)kafka exited with code 3.*kaputt-123"):
        EmbeddedStack().up(tmp_path / "state")
    assert not (tmp_path / "state" / "stack.json").exists()


def test_broker_that_never_answers_times_out_and_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    body = f"echo $$ > {pid_file}; exec sleep 60"
    monkeypatch.setenv("JAVA_HOME", _fake_java(tmp_path / "jdk", body))
    with pytest.raises(StackError, match=r"kafka did not answer within 1 s"):
        EmbeddedStack(ready_timeout_s=1.0).up(tmp_path / "state")
    assert not _running(int(pid_file.read_text()))
    assert not (tmp_path / "state" / "stack.json").exists()


def test_missing_kafka_jars_without_maven_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUDGEFLOW_KAFKA_LIBS", str(tmp_path / "no-libs"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "redis-server").symlink_to(shutil.which("redis-server") or "redis-server")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # redis-server, but no mvn
    with pytest.raises(StackError, match=r"make kafka.*apt-get install -y default-jre-headless"):
        EmbeddedStack().up(tmp_path / "state")
    assert not (tmp_path / "state" / "stack.json").exists()


def test_embedded_stack_context_manager(tmp_path: Path) -> None:
    with embedded_stack(tmp_path) as info:
        assert info.healthy and not info.reused
        with embedded_stack(tmp_path) as inner:  # reuses, and leaves the outer stack running
            assert inner.reused and inner.broker_pid == info.broker_pid
        assert broker_healthy(info.bootstrap_servers) and redis_healthy(info.redis_url)
    assert not _running(info.broker_pid) and not _running(info.redis_pid)
    assert not (tmp_path / "stack.json").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processors.commands.cli", "dev", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def test_cli_up_status_down(tmp_path: Path) -> None:
    state = str(tmp_path)
    up = _cli("up", "--state-dir", state)
    try:
        assert up.returncode == 0, up.stderr
        assert "export NUDGEFLOW_PROFILE=dev" in up.stdout
        info = json.loads((tmp_path / "stack.json").read_text())
        assert info["bootstrap_servers"] in up.stdout and info["redis_url"] in up.stdout
        md = AdminClient({"bootstrap.servers": info["bootstrap_servers"]}).list_topics(timeout=5)
        assert set(topic_specs(Settings())) <= set(md.topics)
        assert all(len(md.topics[t].partitions) == 4 for t in topic_specs(Settings()))

        status = _cli("status", "--state-dir", state)
        assert status.returncode == 0 and status.stdout.count("healthy") == 2
    finally:
        down = _cli("down", "--state-dir", state)
    assert down.returncode == 0, down.stderr
    assert not _running(info["broker_pid"]) and not _running(info["redis_pid"])
    status = _cli("status", "--state-dir", state)
    assert status.returncode == 1 and "nudgeflow dev up" in status.stdout


def test_cli_up_redis_cluster_status_write_read_down(tmp_path: Path) -> None:
    state = str(tmp_path)
    up = _cli("up", "--redis-cluster", "--state-dir", state)
    try:
        assert up.returncode == 0, up.stderr
        info = json.loads((tmp_path / "stack.json").read_text())
        nodes = info["redis_cluster_nodes"]
        assert len(nodes) == 6 and len({n["pid"] for n in nodes}) == 6
        assert info["redis_url"] == f"redis+cluster://127.0.0.1:{nodes[0]['port']}"
        assert info["redis_url"] in up.stdout
        assert all(os.getsid(n["pid"]) == n["pid"] for n in nodes)  # Ctrl-C does not reach them

        assert up.stdout.count("healthy") == 2 and "Redis Cluster" in up.stdout
        status = EmbeddedStack().status(tmp_path)
        assert status is not None and status.healthy and status.redis_cluster
        assert status.redis_url == info["redis_url"]
        assert [n.pid for n in status.redis_nodes] == [n["pid"] for n in nodes]

        # Every process of the dev profile gets the cluster; a real client writes and reads.
        dev = Settings.load(profile="dev", state_dir=tmp_path)
        assert dev.redis_url == info["redis_url"]
        client = connect(dev.redis_url)
        try:
            assert is_cluster(client)
            for i in range(64):
                client.set(f"k{i}", f"v{i}")
            assert [client.get(f"k{i}") for i in range(64)] == [f"v{i}".encode() for i in range(64)]
            masters_with_keys = 0
            for n in nodes:
                node = redis.Redis(port=n["port"])
                try:
                    if node.execute_command("ROLE")[0] == b"master":
                        masters_with_keys += node.dbsize() > 0
                finally:
                    node.close()
            assert masters_with_keys == 3  # the keys are spread over the cluster's 3 masters
        finally:
            client.close()

        # A single Redis is not swapped in for the running cluster, nor the cluster reused.
        with pytest.raises(StackError, match=r"has a Redis Cluster, not a single Redis.*dev down"):
            EmbeddedStack().up(tmp_path)
        assert json.loads((tmp_path / "stack.json").read_text()) == info
    finally:
        down = _cli("down", "--state-dir", state)
    assert down.returncode == 0, down.stderr
    assert not _running(info["broker_pid"])
    assert not any(_running(n["pid"]) for n in nodes)
    assert not redis_healthy(info["redis_url"])
    assert not (tmp_path / "stack.json").exists()
