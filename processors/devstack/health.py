"""Whether the broker and Redis answer."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any


def _tcp_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker_healthy(
    bootstrap: str, timeout: float = 3.0, conf: dict[str, Any] | None = None
) -> bool:
    """True if the broker answers a metadata request (``conf``: e.g. security settings)."""
    host, _, port = bootstrap.rpartition(":")
    if not _tcp_open(host, int(port)):  # avoids librdkafka connect-refused noise on stderr
        return False
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({**(conf or {}), "bootstrap.servers": bootstrap})
        md = admin.list_topics(timeout=timeout)
    except Exception:  # KafkaException on timeout; anything else also means "not healthy"
        return False
    return bool(md.brokers)


def warm_up(bootstrap: str) -> None:
    """Load the transaction coordinator now (~1 s): the first idempotent producer would otherwise
    find it loading and print a retry warning."""
    from confluent_kafka import KafkaException, Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": "nudgeflow-warm-up", "log_level": 0}
    )
    with contextlib.suppress(KafkaException):
        producer.init_transactions(30)


def redis_healthy(url: str, timeout: float = 1.0) -> bool:
    """True if Redis answers PING; for a ``redis+cluster://`` URL, if the cluster also reports
    ``cluster_state:ok``."""
    import redis
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterException

    from processors.redis.client import connect

    try:
        client = connect(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except (redis.RedisError, RedisClusterException):  # a cluster client asks a node at once
        return False
    try:
        if not client.ping():
            return False
        if not isinstance(client, RedisCluster):
            return True
        return _info_fields(client.cluster_info()).get("cluster_state") == "ok"
    except (redis.RedisError, RedisClusterException):
        return False
    finally:
        client.close()


def _info_fields(reply: object) -> dict[str, str]:
    """``key:value`` lines of an INFO-style reply (redis-py may have parsed it already)."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def redis_cluster_healthy(addresses: Sequence[str], timeout: float = 1.0) -> bool:
    """True if every node at ``addresses`` (``host:port``) answers and reports
    ``cluster_state:ok`` with all 16384 slots served."""
    import redis

    for address in addresses:
        host, _, port = address.rpartition(":")
        client = redis.Redis(
            host=host, port=int(port), socket_connect_timeout=timeout, socket_timeout=timeout
        )
        try:
            fields = _info_fields(client.execute_command("CLUSTER", "INFO"))
            if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_ok") != "16384":
                return False
        except redis.RedisError:
            return False
        finally:
            client.close()
    return bool(addresses)
