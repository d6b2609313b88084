"""A dispatcher starts by reading the whole ``contacts`` topic into Redis. On a loaded machine
or with many contacts that takes long; it must still finish (the start-up gives up only when
nothing arrives from the broker for the timeout, not when the read as a whole is slow)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from processors.commands.contacts import import_contacts
from processors.kafka.contacts import ContactsFollower
from processors.redis import RedisStore
from processors.settings import Settings
from schemas.codec import Codec
from tests.integration.test_dispatcher import write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CONTACTS = 4000  # more than one poll's worth (ContactsFollower.poll takes up to 1000)
STORE_S = 0.001  # each profile takes this long to store: a slow Redis on a loaded machine
TIMEOUT_S = 3.0  # the whole read takes over CONTACTS * STORE_S = 4 s, one poll about 1 s


class SlowStore:
    """The Redis store, each write delayed (what a CPU-starved Redis with fsync looks like)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def put_contact(self, user_id: str, record: dict[str, Any] | None, offset: int) -> bool:
        time.sleep(STORE_S)
        return self.store.put_contact(user_id, record, offset)

    def index_phone(self, user_id: str, phone: str | None) -> None:
        self.store.index_phone(user_id, phone)


def test_a_slow_but_steady_contacts_read_is_not_given_up(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rows = [
        {"user_id": f"u{i:04d}", "phone": f"+1415555{i:04d}", "consent": "opted_in"}
        for i in range(CONTACTS)
    ]
    published, _bad = import_contacts(write_jsonl(tmp_path / "c.jsonl", rows), settings)
    assert published == CONTACTS
    store = RedisStore(redis_client)
    follower = ContactsFollower(
        settings, SlowStore(store), Codec(settings.schema_registry_url), "test-contacts"
    )
    try:
        assert follower.load(timeout_s=TIMEOUT_S) == CONTACTS
    finally:
        follower.close()
    assert store.contact(f"u{CONTACTS - 1:04d}") is not None
