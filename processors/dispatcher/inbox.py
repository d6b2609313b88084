"""Consumed decisions-topic records, decoded, waiting in order to be handled."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message

from processors.core.decision import Decision, DecisionCancelled
from processors.dispatcher.offsets import TP, Ref
from processors.kafka.control import CONTROL_HEADER, FLUSH
from processors.kafka.headers import header, header_pairs
from schemas.codec import Codec, CodecError

log = logging.getLogger("nudgeflow.dispatcher")


@dataclass(slots=True)
class Item:
    """A consumed record, decoded (no Redis here)."""

    ref: Ref
    kind: str  # "decision" | "cancel" | "flush" | "undecodable"
    payload: Any = None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    token: str | None = None  # a decision's attempt token, once a batch has reserved it

    @property
    def partition(self) -> int:
        return self.ref[0][1]


def where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (never None for one without error)."""
    return msg.topic() or "", msg.partition() or 0, msg.offset() or 0


class Inbox:
    """Items in consumption order; one leaves only once handled, so a Redis error leaves it
    (and everything after it) for when Redis is back."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.items: deque[Item] = deque()

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def head(self) -> Item:
        return self.items[0]

    def pop(self) -> Item:
        return self.items.popleft()

    def decisions_at_head(self, most: int) -> list[Item]:
        """The consecutive decisions at the head (at most ``most``)."""
        run: list[Item] = []
        for item in self.items:
            if item.kind != "decision" or len(run) >= most:
                break
            run.append(item)
        return run

    def drop(self, gone: set[TP]) -> None:
        """Forget the items of revoked partitions."""
        self.items = deque(item for item in self.items if item.ref[0] not in gone)

    def add(self, msg: Message) -> Ref | None:
        """Decode ``msg`` into an item at the tail; its ref, or None for a consumer error."""
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str())
            return None
        topic, partition, offset = where(msg)
        tp = (topic, partition)
        ref = (tp, offset)
        raw_headers = msg.headers()
        headers = header_pairs(raw_headers) if raw_headers else []
        if headers and header(headers, CONTROL_HEADER) == FLUSH:
            self.items.append(Item(ref, "flush", headers=headers))
            return ref
        try:
            name, record = self.codec.decode(msg.value())
            if name == "TriggerDecision":
                item = Item(ref, "decision", Decision.from_record(record))
            elif name == "DecisionCancelled":
                item = Item(ref, "cancel", DecisionCancelled.from_record(record))
            else:
                raise CodecError(f"unexpected {name} record on the decisions topic")
        except (CodecError, KeyError, TypeError, ValueError) as exc:
            log.warning("dead-lettering undecodable record at %s[%d]@%d: %s", *tp, offset, exc)
            key = msg.key()
            key_b = key.encode() if isinstance(key, str) else key
            item = Item(ref, "undecodable", (key_b, msg.value()))
        self.items.append(item)
        return ref


class Later:
    """Decisions another instance was busy with, to be asked about again when their time comes
    (the other attempt's lease has run out by then)."""

    def __init__(self) -> None:
        self._items: list[tuple[float, Item]] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, item: Item, after_ms: int) -> None:
        self._items.append((time.monotonic() + after_ms / 1000, item))

    def due(self) -> list[Item]:
        now = time.monotonic()
        return [item for at, item in self._items if at <= now]

    def remove(self, item: Item) -> None:
        self._items = [entry for entry in self._items if entry[1] is not item]

    def drop(self, gone: set[TP]) -> None:
        """Forget the items of revoked partitions."""
        self._items = [entry for entry in self._items if entry[1].ref[0] not in gone]
