"""One way to open Redis: a single server (``redis://``, ``rediss://``, ``unix://``) or a Redis
Cluster (``redis+cluster://host:port``, ``rediss+cluster://``: any node as the seed, or several,
``redis+cluster://:pw@h1:7000,h2:7000,h3:7000``, so that one node down at start-up does not
stop a process; the client discovers the others and follows slot moves and failovers).

Every part of :mod:`processors.redis` takes either client; :func:`is_cluster` tells them apart
(on a cluster every script call stays on one slot, see ``docs/guarantees.md``).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis
from redis.cluster import ClusterNode, RedisCluster

Client: TypeAlias = redis.Redis | RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def _split_seeds(url: str) -> tuple[str, list[str], str, str] | None:
    """``(plain scheme, ["host:port", ...], "user:pw@" or "", "/path?query" or "")``."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    if plain is None:
        return None
    auth, at, hosts = rest.rpartition("@")
    cut = min((i for i in (hosts.find("/"), hosts.find("?")) if i >= 0), default=len(hosts))
    return plain, hosts[:cut].split(","), auth + at, hosts[cut:]


def cluster_seed(url: str) -> str | None:
    """The plain ``redis://`` / ``rediss://`` URL of a cluster URL's first seed (credentials and
    options kept); None for a single Redis."""
    parts = _split_seeds(url)
    if parts is None:
        return None
    plain, hosts, auth, tail = parts
    return f"{plain}://{auth}{hosts[0]}{tail}"


def extra_seeds(url: str) -> list[tuple[str, int]]:
    """``(host, port)`` of a cluster URL's seeds after the first (port 6379 when left out)."""
    parts = _split_seeds(url)
    if parts is None:
        return []
    seeds = []
    for host in parts[1][1:]:
        name, colon, port = host.rpartition(":")
        if not colon:
            name, port = port, "6379"
        if not name or not port.isdigit():
            raise ValueError(f"a Redis Cluster seed is host:port, not {host!r}")
        seeds.append((name, int(port)))
    return seeds


def connect(url: str, **kw: Any) -> Client:
    """A client for ``url``: ``redis.cluster.RedisCluster`` for a ``+cluster`` scheme, else
    ``redis.Redis``; ``kw`` go to the client (``retry``, timeouts, ...)."""
    seed = cluster_seed(url)
    if seed is None:
        return redis.Redis.from_url(url, **kw)
    others = [ClusterNode(host, port) for host, port in extra_seeds(url)]
    return RedisCluster.from_url(seed, startup_nodes=others, **kw)


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
