"""Whether the broker and Redis answer."""

from __future__ import annotations

import contextlib
import socket
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
    """True if Redis answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()
