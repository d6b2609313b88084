"""The two Redis deployments the store runs on: a single redis-server and a local Redis Cluster
(3 masters + 3 replicas), each started once per test session on free loopback ports, no
broker needed. ``any_redis`` gives a test a client of either, empty at its start and end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

from processors.devstack.redis_cluster import LocalRedisCluster
from processors.redis.client import Client, connect
from tests.support.own_redis import own_redis

BACKENDS = ("single", "cluster")
C = TypeVar("C", bound=Client)


@contextmanager
def flushed(client: C) -> Iterator[C]:
    """``client`` with its database empty at the start and at the end; closed afterwards."""
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    with own_redis() as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def cluster_url(cluster: LocalRedisCluster) -> str:
    """The ``redis+cluster://`` URL NudgeFlow's settings take for ``cluster``."""
    return f"redis+cluster://{cluster.nodes[0].address}"


@pytest.fixture(params=BACKENDS)
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's single Redis, then of its Redis Cluster."""
    if request.param == "single":
        return str(request.getfixturevalue("single_redis_url"))
    return cluster_url(request.getfixturevalue("redis_cluster"))


@pytest.fixture
def any_redis(any_redis_url: str) -> Iterator[Client]:
    """A client of ``any_redis_url`` (``redis.Redis`` or ``RedisCluster``), flushed around the
    test."""
    with flushed(connect(any_redis_url)) as client:
        yield client
