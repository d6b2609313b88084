"""Shared fixtures: one embedded stack (Apache Kafka + redis-server) per test session.

Tests share the broker but never a topic or consumer group: the ``settings`` fixture suffixes
every topic and group name with a fresh uuid, so tests stay independent and order-free, and
deletes those topics (and the worker's changelog topics) when the test ends.
"""

from __future__ import annotations

import contextlib
import gc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from processors.devstack import EmbeddedStack, StackInfo, create_topics
from processors.settings import Settings
from tests.support.redis_backends import (  # noqa: F401 (fixtures: a single Redis, a cluster)
    any_redis,
    any_redis_url,
    flushed,
    redis_cluster,
    single_redis_url,
)

STACK_FIXTURES = {"stack", "bootstrap", "redis_url", "redis_client", "settings"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the embedded stack, so `-m "not integration"` skips them."""
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A fresh broker + Redis for the session, with the default topics (4 partitions)."""
    state_dir = tmp_path_factory.mktemp("devstack")
    embedded = EmbeddedStack()
    info = embedded.up(state_dir)
    try:
        base = Settings.load(
            profile="dev",
            state_dir=state_dir,
            bootstrap_servers=info.bootstrap_servers,
            redis_url=info.redis_url,
            partitions=4,
        )
        create_topics(info.bootstrap_servers, base)
        yield info
    finally:
        # Clients that tests dropped but that sit in reference cycles go now, while the broker
        # still answers, instead of reconnecting to a stopped broker in the summary's output.
        gc.collect()
        embedded.down(state_dir)


@pytest.fixture(scope="session")
def bootstrap(stack: StackInfo) -> str:
    return stack.bootstrap_servers


@pytest.fixture(scope="session")
def redis_url(stack: StackInfo) -> str:
    return stack.redis_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session Redis; its DB is empty at the start and end of every test."""
    with flushed(redis.Redis.from_url(redis_url)) as client:
        yield client


@pytest.fixture
def settings(stack: StackInfo, tmp_path: Path) -> Iterator[Settings]:
    """Dev-profile settings on the session stack with per-test topics and groups (created)."""
    result = isolated_settings(stack, outbox_path=tmp_path / "outbox.jsonl")
    yield result
    delete_topics(stack.bootstrap_servers, result.topic_clickstream.rsplit("-", 1)[1])


def delete_topics(bootstrap: str, suffix: str) -> None:
    """Delete every topic whose name holds ``suffix``: a long session keeps a small broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if suffix in t]
    for future in admin.delete_topics(names, operation_timeout=10).values() if names else ():
        with contextlib.suppress(KafkaException):
            future.result(timeout=30)


def isolated_settings(stack: StackInfo, **overrides: object) -> Settings:
    """Settings on ``stack`` with fresh topics (created), consumer groups and worker id."""
    suffix = uuid.uuid4().hex[:10]
    defaults = Settings()
    topics = {
        name: f"{getattr(defaults, name)}-{suffix}"
        for name in Settings.model_fields
        if name.startswith("topic_")
    }
    result = Settings.load(
        profile="dev",
        state_dir=stack.state_dir,
        bootstrap_servers=stack.bootstrap_servers,
        redis_url=stack.redis_url,
        dispatcher_group=f"{defaults.dispatcher_group}-{suffix}",
        worker_id=f"{defaults.worker_id}-{suffix}",
        **{**topics, **overrides},  # type: ignore[arg-type]
    )
    create_topics(stack.bootstrap_servers, result)
    return result
