"""Checkpoints: the worker's state and its clickstream positions, written together.

Between checkpoints every state change stays in a write-back buffer (one entry per user, per
partition) that every read goes through. A checkpoint then

1. flushes the producer: every decision, cancellation and dead letter produced so far is on
   its topic before any state that presumes it;
2. writes one changelog record per changed user to the ``user_state`` table's changelog
   partition p;
3. writes a **position record** (key :func:`position_key`) holding the next clickstream offset
   of partition p after them (the producer is idempotent, so it lands after them), and flushes;
4. applies the same records to the table's local store (what Faust's own recovery would do
   with them), so reads see them once the buffer is cleared.

Why the position lives in the changelog and not in a consumer group's committed offsets: on
recovery the new owner of partition p restores the changelog and resumes the clickstream at
the position it finds there. Any prefix of the changelog is consistent (the position record is
the last record of its checkpoint, so every state it covers comes before it): a worker killed
mid-checkpoint at worst restores some users *ahead* of the position, and the replayed events
are then de-duplicated by the engine (``event_id``), while the decisions they made carry the
same deterministic ids.

States are encoded when a checkpoint takes them, not at every change (:class:`Deferred`): a
user with several events between two checkpoints is encoded once (the worker's per-event cost,
docs/performance.md). What is written is exactly each state as it was at the positions taken:
``take`` either encodes the buffer at once (while the caller holds the worker's lock) or, for
the worker's checkpoints, only swaps it out (``encode=False``); the taken states are then
encoded a chunk per turn of the event loop, and a step that reads one before its turn encodes
it first (:meth:`Checkpointer.get`), before it can change it in place.

A committed group offset, by contrast, can be ahead of the restored state, and then
events are lost; that is the failure the chaos suite found with Faust's own commits.

Committed offsets are still written (after the checkpoint, to the ``<worker id>-clickstream``
group) for lag monitoring and autoscaling only; nothing reads them back.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from faust.stores.memory import Store as MemoryStore
from faust.types import TP

from streams.output import Output

POSITION_PREFIX = b"\x00nudgeflow:position:"
"""Keys of position records; user ids never start with NUL (streams.intake rejects them)."""
_POSITION = struct.Struct(">q")
ENCODE_CHUNK = 256  # states encoded or sent per turn of the event loop while a checkpoint runs


def position_key(partition: int) -> bytes:
    return POSITION_PREFIX + str(partition).encode()


def is_position_key(key: bytes) -> bool:
    return key.startswith(POSITION_PREFIX)


def encode_position(offset: int) -> bytes:
    return _POSITION.pack(offset)


def decode_position(value: bytes | None) -> int | None:
    if value is None or len(value) != _POSITION.size:
        return None
    return int(_POSITION.unpack(value)[0])


class Deferred(Protocol):
    """A buffered value encoded only when a checkpoint takes it (the worker's live user state)."""

    def encode(self) -> bytes: ...


Value = bytes | Deferred | None  # None: delete the key
Taken = tuple[dict[int, dict[bytes, Value]], dict[int, int], int]
"""What :meth:`Checkpointer.take` took: values by partition (deferred ones until
:meth:`Checkpointer.encode_taken`), positions, the output barrier."""


def _encoded(value: Value) -> bytes | None:
    return value if value is None or type(value) is bytes else cast(Deferred, value).encode()


@dataclass(slots=True)
class _Record:
    """A changelog record in the shape a Faust store's ``apply_changelog_batch`` reads (an event
    whose ``message`` is itself)."""

    key: bytes
    value: bytes | None
    partition: int
    offset: int
    tp: TP

    @property
    def message(self) -> _Record:
        return self


def _same(x: Any) -> Any:
    return x


class Checkpointer:
    """The write-back buffer of one worker and the checkpoints that empty it.

    A checkpoint takes the buffer as it is (:meth:`take`, synchronous: the caller holds the
    worker's lock for that instant only) and writes it while processing goes on into a fresh
    buffer; reads look at the fresh buffer, then the one being written, then the store.
    """

    def __init__(self, store: Any, output: Output, changelog_topic: str) -> None:
        """``store``: the Faust table's store (``table.data``), read and applied to directly."""
        self.store = store
        self.output = output
        self.changelog_topic = changelog_topic
        self._dirty: dict[int, dict[bytes, Value]] = {}
        self._writing: dict[int, dict[bytes, Value]] = {}
        self._positions: dict[int, int] = {}  # partition -> next offset, not yet checkpointed
        self._last: dict[int, int] = {}  # partition -> last position written
        self.checkpoints = 0
        self.records_written = 0

    @property
    def store(self) -> Any:
        return self._store

    @store.setter
    def store(self, store: Any) -> None:
        self._store = store
        # Faust's in-memory store keeps its values in a plain dict (``data``, never replaced);
        # its own ``get`` goes through three Python calls and raises KeyError for every new
        # user, ~1-2 us per read on the worker's hot path.
        data = getattr(store, "data", None)
        self._read = (
            data.get if isinstance(store, MemoryStore) and type(data) is dict else store.get
        )

    # -------------------------------------------------------------- reads and buffered writes

    def get(self, partition: int, key: bytes) -> Value:
        """The user's current value: the buffer first (maybe a :class:`Deferred`), then the one
        being written, then the store."""
        dirty = self._dirty.get(partition)
        if dirty is not None and key in dirty:
            return dirty[key]
        writing = self._writing.get(partition)
        if writing is not None and key in writing:
            value = writing[key]
            if value is not None and type(value) is not bytes:
                # Taken but not encoded yet (:meth:`encode_taken`): encode it before the
                # caller's step changes the state in place.
                value = writing[key] = cast(Deferred, value).encode()
            return value
        return self._read(key)

    def put(self, partition: int, key: bytes, value: Value) -> None:
        """Buffer a new value (None = delete; a :class:`Deferred` is encoded by :meth:`take`)
        until the next checkpoint."""
        dirty = self._dirty.get(partition)
        if dirty is None:
            dirty = self._dirty[partition] = {}
        dirty[key] = value

    def advance(self, partition: int, next_offset: int) -> None:
        """Record that every clickstream record of ``partition`` before ``next_offset`` has been
        applied (to the buffer)."""
        self._positions[partition] = next_offset

    def position(self, partition: int) -> int | None:
        """The checkpointed clickstream position of ``partition`` (None: never checkpointed)."""
        return decode_position(self.store.get(position_key(partition)))

    def pending(self) -> int:
        return sum(len(d) for d in self._dirty.values())

    def buffered(self) -> Iterator[tuple[bytes, bytes | None]]:
        """Every buffered value, oldest layer first (for scans that must see them)."""
        layers: tuple[dict[int, dict[bytes, Value]], ...] = (self._writing, self._dirty)
        for layer in layers:
            for dirty in list(layer.values()):
                for key, value in list(dirty.items()):
                    yield key, _encoded(value)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget buffered changes of partitions this worker no longer owns (not written)."""
        for p in partitions:
            self._dirty.pop(p, None)
            self._positions.pop(p, None)
            self._last.pop(p, None)

    def forget(self) -> None:
        """Forget every buffered change and every position written (the worker let go of, or
        lost, all its partitions): what comes next starts from the store's positions."""
        self._dirty.clear()
        self._writing = {}
        self._positions.clear()
        self._last.clear()

    # -------------------------------------------------------------- the checkpoint

    def take(self, *, encode: bool = True) -> Taken | None:
        """Start a checkpoint: the buffer, the positions it covers and the output barrier of
        everything produced so far; None when there is nothing to write.

        ``encode=False``: the states are encoded later, by :meth:`encode_taken` (a few hundred
        between turns of the event loop) or by :meth:`get` when a step reads one first, so
        what is written is still each state as it was when taken, and taking stops processing
        for a dict swap instead of every encode."""
        if not self._dirty and not self._positions:
            return None
        if self._writing:
            raise RuntimeError("a checkpoint is already being written")
        batch = self._dirty
        if encode:
            for items in batch.values():
                self._encode_items(items)
        positions = self._positions
        self._dirty, self._positions = {}, {}
        self._writing = batch
        for p in batch:
            if p not in positions:  # states only (timers fired): repeat the last position
                last = self._last.get(p)
                if last is None:
                    last = self.position(p)
                if last is not None:
                    positions[p] = last
        return batch, positions, self.output.barrier()

    def _encode_items(self, items: dict[bytes, Value], keys: Iterable[bytes] | None = None) -> None:
        """Encode the deferred values of ``items`` (of ``keys``: all by default) in place; a
        state equal to the stored value is not written again (e.g. a tick that changed
        nothing)."""
        get = self._read
        unchanged: list[bytes] = []
        for key in items if keys is None else keys:
            value = items[key]
            if value is None or type(value) is bytes:
                continue
            encoded = items[key] = cast(Deferred, value).encode()
            if encoded == get(key):
                unchanged.append(key)
        for key in unchanged:
            del items[key]

    async def encode_taken(
        self,
        taken: Taken,
        chunk: int = ENCODE_CHUNK,
    ) -> None:
        """Encode what ``take(encode=False)`` took, ``chunk`` states per turn of the event loop
        (steps go on meanwhile; one that reads a taken state encodes it first, :meth:`get`)."""
        for items in taken[0].values():
            keys = list(items)
            for start in range(0, len(keys), chunk):
                self._encode_items(items, keys[start : start + chunk])
                await asyncio.sleep(0)

    def put_back(self, taken: Taken) -> None:
        """A checkpoint :meth:`take` started is not written: its values and positions go back
        into the buffer under anything newer, so reads and the next checkpoint still see them."""
        batch, positions, _barrier = taken
        for p, items in batch.items():
            newer = self._dirty.get(p, {})
            self._dirty[p] = {**items, **newer}
        for p, offset in positions.items():
            self._positions.setdefault(p, offset)
        self._writing = {}

    async def write(self, taken: Taken) -> dict[int, int]:
        """Finish the checkpoint :meth:`take` started (module docstring); returns the positions
        it recorded. Processing may go on meanwhile (it writes into a fresh buffer)."""
        batch, positions, barrier = taken
        try:
            await self.output.wait(barrier)  # 1. what the states presume is on its topics
            await self.encode_taken(taken)  # a no-op when take() encoded them
            send_many, topic = self.output.send_many, self.changelog_topic
            for p, items in batch.items():
                records = [(key, _encoded(value)) for key, value in items.items()]
                for start in range(0, len(records), ENCODE_CHUNK):
                    send_many(topic, p, records[start : start + ENCODE_CHUNK])
                    await asyncio.sleep(0)  # steps go on between chunks
            delivered: dict[int, int] = {}

            def on_delivery(err: Any, msg: Any) -> None:
                if err is None:
                    delivered[msg.partition()] = msg.offset()

            for p, offset in positions.items():
                # After its partition's states: the producer keeps their order (idempotent).
                self.output.send(
                    self.changelog_topic,
                    encode_position(offset),
                    position_key(p),
                    partition=p,
                    on_delivery=on_delivery,
                )
            await self.output.flush()  # 2.-3. the states, then the positions, durable
        except BaseException:
            self.put_back(taken)  # the caller normally stops the worker
            raise
        applied: dict[int, dict[bytes, bytes | None]] = {}
        for p in set(batch) | set(positions):
            items_p = cast("dict[bytes, bytes | None]", dict(batch.get(p, {})))  # encoded above
            if p in positions:
                items_p[position_key(p)] = encode_position(positions[p])
                self._last[p] = positions[p]
            applied[p] = items_p
            self.records_written += len(items_p)
        self._apply(applied, delivered)  # 4.
        self._writing = {}
        self.checkpoints += 1
        return positions

    def _apply(
        self, applied: dict[int, dict[bytes, bytes | None]], delivered: dict[int, int]
    ) -> None:
        """Apply written records to the store as Faust's recovery would (None deletes). Faust's
        in-memory store is a dict plus a key -> partition map: updated in bulk, not through one
        changelog event object per record."""
        store = self.store
        data = getattr(store, "data", None)
        key_partition = getattr(store, "_key_partition", None)
        if isinstance(store, MemoryStore) and type(data) is dict and type(key_partition) is dict:
            for p, items in applied.items():
                data.update(items)
                key_partition.update(dict.fromkeys(items, p))
                for key, value in items.items():
                    if value is None:
                        del data[key]
                        del key_partition[key]
            return
        records: list[_Record] = []
        for p, items in applied.items():
            tp = TP(self.changelog_topic, p)
            offset = delivered.get(p, 0)
            records.extend(_Record(k, v, p, offset, tp) for k, v in items.items())
        store.apply_changelog_batch(records, _same, _same)

    async def checkpoint(self) -> dict[int, int]:
        """:meth:`take` + :meth:`write` in one go (the caller keeps processing stopped)."""
        taken = self.take()
        return {} if taken is None else await self.write(taken)
