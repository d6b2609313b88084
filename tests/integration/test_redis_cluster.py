"""The local Redis Cluster the embedded stack and the tests use: 3 masters + 3 replicas from
the ``redis-server`` binary; a SIGKILLed master's replica takes over and a cluster client
rides through with the data that was replicated, and so does the Redis store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from processors.devstack.redis_cluster import LocalRedisCluster
from processors.redis.client import connect
from tests.support.own_redis import _free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    c = LocalRedisCluster(tmp_path / "cluster").start()
    try:
        yield c
    finally:
        c.stop()


def test_three_masters_serve_every_slot_and_a_replica_takes_over(
    cluster: LocalRedisCluster,
) -> None:
    client = RedisCluster.from_url(cluster.url, socket_timeout=2)
    try:
        nodes = client.cluster_nodes()  # "host:port" -> fields
        masters = {
            int(a.rsplit(":", 1)[1]) for a, n in nodes.items() if "master" in str(n["flags"])
        }
        assert len(masters) == 3
        # One user's keys share a slot (hash tag); users spread over every master.
        for i in range(300):
            client.set(f"nf:{{u:{i}}}:contact", f"c{i}")
            client.set(f"nf:{{u:{i}}}:texted", "1")
        holders = {cluster.master_of(f"nf:{{u:{i}}}:contact").port for i in range(300)}
        assert holders == masters
        assert client.keyslot("nf:{u:7}:contact") == client.keyslot("nf:{u:7}:texted")

        victim = cluster.master_of("nf:{u:7}:contact")
        with victim.client() as direct:
            assert direct.execute_command("WAIT", 1, 2000) >= 1  # replicated before the kill
        cluster.kill(victim)
        deadline = time.monotonic() + 30
        while cluster.master_of("nf:{u:7}:contact").port == victim.port:
            assert time.monotonic() < deadline, "no replica took over the killed master's slots"
            time.sleep(0.2)
        cluster.wait_healthy(timeout=30)
        while True:
            try:
                assert client.get("nf:{u:7}:contact") == b"c7"
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the cluster client never reached the replica"
                time.sleep(0.2)
        assert [client.get(f"nf:{{u:{i}}}:contact") for i in range(300)] == [
            f"c{i}".encode() for i in range(300)
        ]
    finally:
        client.close()


def test_the_store_rides_through_a_failover(cluster: LocalRedisCluster) -> None:
    """A batch for users on every master, a master SIGKILLed, its replica promoted: the next
    batches run (the promoted replica had never loaded the store's scripts) and the decisions
    recorded before the kill (replicated) are found as they were."""
    from processors.core.decision import Decision
    from processors.redis import RedisStore
    from processors.redis.client import connect

    client = connect(f"redis+cluster://{cluster.nodes[0].address}", socket_timeout=2)
    try:
        store = RedisStore(client)
        users = [f"u{i}" for i in range(60)]
        now = 1_710_331_200_000
        first = [(Decision(f"a-{u}", "c", u, now, ("e",), now), "t1") for u in users]
        assert {p.state for p, _ in store.prepare_many(first)} == {"new"}
        store.mark_emitted_many([(u, f"a-{u}", "x") for u in users])
        victim = cluster.master_of(store.user_key(users[0]))
        with victim.client() as direct:
            assert direct.execute_command("WAIT", 1, 2000) >= 1  # replicated before the kill
        cluster.kill(victim)
        deadline = time.monotonic() + 30
        while cluster.master_of(store.user_key(users[0])).port == victim.port:
            assert time.monotonic() < deadline, "no replica took over the killed master's slots"
            time.sleep(0.2)
        cluster.wait_healthy(timeout=30)
        second = [(Decision(f"b-{u}", "c", u, now, ("e",), now), "t2") for u in users]
        while True:
            try:
                prepared = store.prepare_many(second)
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the store never reached the promoted replica"
                time.sleep(0.2)
        assert {p.state for p, _ in prepared} == {"new"}
        again = store.prepare_many(first)  # the same attempt asks again: its own reservation
        assert {p.state for p, _ in again} == {"reserved"}
        assert {client.hget(store.decision_key(u, f"a-{u}"), "e") for u in users} == {b"x"}
    finally:
        client.close()


def test_the_dispatcher_waits_for_a_dead_master_until_its_replica_takes_over(
    cluster: LocalRedisCluster,
) -> None:
    """A dispatcher that met a dead master (a Redis outage for its slots) probes Redis: "back"
    only once the replica serves them, not at the first node that answers a PING."""
    import threading

    from confluent_kafka import Consumer

    from processors.dispatcher.outage import RedisWatch, connect
    from processors.settings import Settings

    settings = Settings.load(profile="dev", redis_url=f"redis+cluster://{cluster.nodes[0].address}")
    client = connect(settings)
    consumer = Consumer({"bootstrap.servers": "127.0.0.1:9", "group.id": "probe", "log_level": 0})
    try:
        key = "{nudgeflow:ratelimit:gateway}"
        victim = cluster.master_of(key)
        if victim is cluster.nodes[0]:  # the seed stays up: kill the other master's slot
            key = next(k for k in (f"{{k{i}}}" for i in range(100))
                       if cluster.master_of(k) is not victim)  # fmt: skip
            victim = cluster.master_of(key)
        client.set(key, "1")
        watch = RedisWatch(client, consumer, threading.Event())
        cluster.kill(victim)
        with pytest.raises(redis.ConnectionError):
            client.set(key, "2")
        watch.lost(redis.ConnectionError("master gone"))
        probes_down = 0
        deadline = time.monotonic() + 30
        while cluster.master_of(key).port == victim.port:
            assert time.monotonic() < deadline, "no replica took over the killed master's slots"
            if time.monotonic() >= watch._probe_at:
                assert not watch.probe(), "Redis reported back while a master was dead"
                probes_down += 1
            time.sleep(0.02)
        assert probes_down >= 2 and watch.down
        while not watch.probe():
            assert time.monotonic() < deadline, "the probe never saw the promoted replica"
            time.sleep(0.05)
        client.set(key, "3")  # the slot is served again
        assert client.get(key) == b"3"
    finally:
        consumer.close()
        client.close()


def test_a_process_starts_while_its_first_seed_node_is_down(
    redis_cluster: LocalRedisCluster,
) -> None:
    """Several seeds in the URL: the client skips one that does not answer."""
    dead = _free_port()  # nothing listens there
    live = redis_cluster.nodes[1].address
    with pytest.raises(RedisClusterException, match="reachable"):
        connect(f"redis+cluster://127.0.0.1:{dead}", socket_connect_timeout=1)
    client = connect(f"redis+cluster://127.0.0.1:{dead},{live}", socket_connect_timeout=1)
    try:
        assert isinstance(client, RedisCluster)
        for i in range(32):  # keys on every master
            client.set(f"seed-test:{i}", i)
        assert [int(client.get(f"seed-test:{i}")) for i in range(32)] == list(range(32))  # type: ignore[arg-type]
        client.delete(*(f"seed-test:{i}" for i in range(32)))
    finally:
        client.close()
