"""A simulated clickstream through the worker's batch path (``Pipeline.process`` with checkpoints,
no broker): what the compiled and the interpreted shell must agree on. Run as
a script it prints the result as JSON.

The records include bad data (dead-lettered), a key that is not the event's user and an
end-of-input record per partition (every pending timer commits: the engine's ``on_time`` path).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

from processors.kafka.control import CONTROL_HEADER, FLUSH
from processors.settings import Settings
from processors.simulate import generate

PARTITIONS = 2
BATCH = 500
CHECKPOINT_EVERY = 2  # batches


class Record:
    """What the worker reads of a confluent-kafka ``Message``."""

    __slots__ = ("_key", "_value", "_offset", "_partition", "_headers")

    def __init__(
        self, key: bytes | None, value: bytes, offset: int, partition: int, headers: Any = None
    ) -> None:
        self._key, self._value, self._offset = key, value, offset
        self._partition, self._headers = partition, headers

    def error(self) -> None:
        return None

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return self._partition

    def headers(self) -> Any:
        return self._headers


class Recorder:
    """The worker's producer, minus Kafka: every record kept, at once "delivered"."""

    def __init__(self) -> None:
        self.sent: list[list[Any]] = []

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None:
        pairs = sorted((k, v.hex()) for k, v in dict(headers or {}).items())
        hexed = None if value is None else value.hex()
        self.sent.append([topic, None if key is None else key.hex(), hexed, partition, pairs])

    def send_many(
        self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> None:
        for key, value in records:
            self.send(topic, value, key, partition=partition)

    def barrier(self) -> int:
        return 0

    async def wait(self, barrier: int) -> None:
        return None

    async def flush(self) -> None:
        return None


class Reader:
    """The clickstream reader's bookkeeping without its consumer."""

    def __init__(self) -> None:
        self.owned: set[int] = set(range(PARTITIONS))
        self.positions: dict[int, int | None] = dict.fromkeys(range(PARTITIONS), 0)

    def commit(self, positions: dict[int, int]) -> None:
        return None


def worker_replay() -> dict[str, Any]:
    """Every record the worker produced, in order; the store after the last checkpoint (hex);
    the open-episodes gauge before the end of input."""
    from streams.worker import build

    settings = Settings.load(profile="dev", clock="event", worker_id="worker-replay")
    _app, shell = build(settings)
    recorder = Recorder()
    shell.clients._output = recorder  # type: ignore[assignment]
    shell.clients._reader = Reader()  # type: ignore[assignment]
    codec = shell.codec
    records: list[Record] = []
    offsets = [0] * PARTITIONS

    def add(key: bytes | None, value: bytes, partition: int, headers: Any = None) -> None:
        records.append(Record(key, value, offsets[partition], partition, headers))
        offsets[partition] += 1

    for i, click in enumerate(generate(300, 6_000, 11)):
        key = click.user_id.encode()
        value = codec.encode("ClickEvent", click.to_record())
        partition = zlib.crc32(key) % PARTITIONS
        if i % 997 == 0:
            add(key, b"not avro", partition)  # dead-lettered: not_wire_format
        if i % 1499 == 0:
            add(b"someone-else", value, partition)  # dead-lettered: key_mismatch
        add(key, value, partition)
    episodes = shell.steps.episodes
    checkpointer = shell.clients.checkpointer

    async def replay() -> dict[str, int]:
        for n, start in enumerate(range(0, len(records), BATCH), 1):
            await shell.pipeline.process(records[start : start + BATCH])  # type: ignore[arg-type]
            if n % CHECKPOINT_EVERY == 0:
                await checkpointer.checkpoint()
        open_now = {c: episodes.gauge.value(c) for c in sorted(episodes.campaign_ids)}
        flush = [(CONTROL_HEADER, FLUSH)]
        ends = [Record(None, b"", offsets[p], p, flush) for p in range(PARTITIONS)]
        await shell.pipeline.process(ends)  # type: ignore[arg-type]
        await checkpointer.checkpoint()
        return open_now

    open_episodes = asyncio.run(replay())
    store = checkpointer.store.data
    return {
        "sent": recorder.sent,
        "store": {k.hex(): v.hex() for k, v in sorted(store.items())},
        "open_episodes": open_episodes,
        "dead_letters": dict(shell.stats.dead_letters),
    }


if __name__ == "__main__":
    print(json.dumps(worker_replay()))
