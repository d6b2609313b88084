"""The compacted ``contacts`` topic, followed into Redis (dispatcher and webhooks alike).

Every profile is stored at its offset (an older offset never overwrites a newer one) and its
number indexed (phone -> users, what a STOP needs); a tombstone deletes both. The follower
reads the topic to its end first (:meth:`ContactsFollower.load`), then as it grows
(:meth:`ContactsFollower.poll`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from processors.settings import Settings
from schemas.codec import Codec, CodecError

log = logging.getLogger("nudgeflow.contacts")


class ContactStore(Protocol):
    def put_contact(self, user_id: str, record: dict[str, Any] | None, offset: int) -> bool: ...

    def index_phone(self, user_id: str, phone: str | None) -> None: ...


class ContactsFollower:
    """Reads every partition of the contacts topic from the beginning, without a group commit
    (a private group id per instance). Not thread-safe: one thread polls it."""

    def __init__(self, settings: Settings, store: ContactStore, codec: Codec, group: str) -> None:
        """``group``: the prefix of the private group id (``nudgeflow-contacts`` ...)."""
        self.settings = settings
        self.store = store
        self.codec = codec
        self.group = group
        self.applied = 0  # profiles read so far
        self.read = 0  # records stored so far (profiles, tombstones, skipped ones)
        self.consumer: Consumer | None = None
        self._ends: dict[int, int] = {}  # partition -> its end when assigned, until reached
        self._buffer: deque[Message] = deque()

    def start(self) -> None:
        """Assign every partition from its beginning and note where each ends now (again
        after a failed :meth:`load`)."""
        if self.consumer is None:
            self.consumer = Consumer(
                {
                    **self.settings.kafka_common(),
                    "group.id": f"{self.group}-{uuid.uuid4().hex[:12]}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                }
            )
        self._buffer.clear()
        self._ends.clear()
        topic = self.settings.topic_contacts
        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise RuntimeError(f"contacts topic {topic!r} does not exist")
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        self.consumer.assign(parts)
        for tp in parts:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            if high > low:
                self._ends[tp.partition] = high

    @property
    def at_end(self) -> bool:
        """Whether every partition has been read to where it ended at :meth:`start`."""
        return not self._ends

    def load(self, timeout_s: float = 30.0) -> int:
        """:meth:`start`, then read to the end; returns the profiles read. Raises when no
        record arrives for ``timeout_s`` (the broker unreachable), however long a topic that
        keeps coming takes."""
        self.start()
        deadline = time.monotonic() + timeout_s
        while not self.at_end and time.monotonic() < deadline:
            read = self.read
            self.poll(0.5)
            if self.read > read:
                deadline = time.monotonic() + timeout_s
        if not self.at_end:
            raise RuntimeError(
                f"could not read the contacts topic to its end: nothing arrived in {timeout_s:.0f}s"
            )
        log.info("contacts materialized: %d profiles", self.applied)
        return self.applied

    def poll(self, timeout_s: float = 0.0) -> None:
        """Store what has arrived. A record leaves the buffer only once stored, so a Redis
        error (raised here) loses none: the next call starts with it."""
        assert self.consumer is not None, "start() first"
        if not self._buffer:
            self._buffer.extend(self.consumer.consume(1000, timeout=timeout_s))
        while self._buffer:
            msg = self._buffer[0]
            if msg.error() is None:
                self.apply(msg)
                self.read += 1
                partition, offset = msg.partition() or 0, msg.offset() or 0
                if offset + 1 >= self._ends.get(partition, 0):
                    self._ends.pop(partition, None)
            self._buffer.popleft()

    def apply(self, msg: Message) -> None:
        """Store one record: a profile, or a tombstone (an undecodable one is skipped)."""
        key = msg.key()
        if key is None:
            return
        user_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        offset = msg.offset() or 0
        value = msg.value()
        if value is None:
            if self.store.put_contact(user_id, None, offset):
                self.store.index_phone(user_id, None)
            return
        try:
            name, record = self.codec.decode(value)
        except CodecError as exc:
            log.warning("skipping undecodable contact at offset %d: %s", offset, exc)
            return
        if name != "ContactProfile":
            return
        if self.store.put_contact(user_id, record, offset):
            phone = record.get("phone")
            self.store.index_phone(user_id, phone if isinstance(phone, str) else None)
        self.applied += 1

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None


class ContactsThread:
    """A :class:`ContactsFollower` in a daemon thread: ``ready`` once the topic is read to its
    end, ``error`` if it stopped (both for a health check)."""

    def __init__(self, follower: ContactsFollower, name: str) -> None:
        self.follower = follower
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        follower = self.follower
        try:
            follower.start()
            while not self._stop.is_set():
                if follower.at_end and not self.ready.is_set():
                    self.ready.set()
                    log.info("contacts read to the end: %d profiles", follower.applied)
                follower.poll(0.2)
        except BaseException as exc:  # noqa: BLE001 - reported through the health check
            self.error = exc
            log.error("contacts follower stopped: %s", type(exc).__name__)
        finally:
            follower.close()
