"""Which Redis a URL selects: ``+cluster`` schemes a Redis Cluster, every other a single Redis."""

from __future__ import annotations

import pytest
import redis

from processors.redis.client import cluster_seed, connect, extra_seeds, is_cluster
from processors.settings import redact_url


def test_cluster_schemes_give_the_seed_of_a_cluster_client() -> None:
    assert cluster_seed("redis+cluster://h1:7000") == "redis://h1:7000"
    assert cluster_seed("rediss+cluster://:pw@h1:7000") == "rediss://:pw@h1:7000"
    assert cluster_seed("REDIS+CLUSTER://h1:7000") == "redis://h1:7000"
    for single in ("redis://h:6379/0", "rediss://h:6380", "unix:///run/redis.sock", "h:6379"):
        assert cluster_seed(single) is None


def test_a_cluster_url_may_name_several_seeds() -> None:
    url = "rediss+cluster://:pw@h1:7000,h2:7001,h3/0?socket_timeout=2"
    assert cluster_seed(url) == "rediss://:pw@h1:7000/0?socket_timeout=2"
    assert extra_seeds(url) == [("h2", 7001), ("h3", 6379)]
    assert extra_seeds("redis+cluster://h1:7000") == []
    assert extra_seeds("redis://h1:6379,h2:6379") == []  # not a cluster URL: no seeds
    with pytest.raises(ValueError, match="host:port"):
        extra_seeds("redis+cluster://h1:7000,h2:x")
    assert redact_url("redis+cluster://:pw@h1:7000,h2:7001") == (
        "redis+cluster://:**********@h1:7000,h2:7001"
    )


def test_a_plain_url_gives_a_single_redis_client() -> None:
    client = connect("redis://127.0.0.1:1/0")  # connects lazily: nothing listens there
    try:
        assert isinstance(client, redis.Redis) and not is_cluster(client)
    finally:
        client.close()


def test_a_cluster_url_password_is_masked() -> None:
    assert (
        redact_url("rediss+cluster://user:pw@h1:7000") == "rediss+cluster://user:**********@h1:7000"
    )
