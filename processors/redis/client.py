"""One way to open Redis: a single server (``redis://``, ``rediss://``, ``unix://``) or a Redis
Cluster (``redis+cluster://host:port``, ``rediss+cluster://``: any node as the seed; the client
discovers the others and follows slot moves and failovers).

Every part of :mod:`processors.redis` takes either client; :func:`is_cluster` tells them apart
(on a cluster every script call stays on one slot, see ``docs/guarantees.md``).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis
from redis.cluster import RedisCluster

Client: TypeAlias = redis.Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_seed(url: str) -> str | None:
    """The plain ``redis://`` / ``rediss://`` seed of a cluster URL; None for a single Redis."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    return f"{plain}://{rest}" if plain else None


def connect(url: str, **kw: Any) -> Client:
    """A client for ``url``: ``redis.cluster.RedisCluster`` for a ``+cluster`` scheme, else
    ``redis.Redis``; ``kw`` go to the client (``retry``, timeouts, ...)."""
    seed = cluster_seed(url)
    if seed is None:
        return redis.Redis.from_url(url, **kw)
    return RedisCluster.from_url(seed, **kw)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def ping(client: Client) -> None:
    """Raise unless Redis answers: a single server, or on a cluster every master of the
    client's slot map (a PING to one node would answer while a dead master's slots are not
    served, until its replica takes over)."""
    if isinstance(client, RedisCluster):
        client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        client.ping()
