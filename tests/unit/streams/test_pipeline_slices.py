"""The read loop lets go of the worker's lock between slices of a batch: a tick (or anything
else that needs the lock) waiting while a large batch is processed goes in after one slice, not
after the whole batch."""

from __future__ import annotations

import asyncio
import zlib

from processors.settings import Settings
from processors.simulate import generate
from streams.pipeline import SLICE
from tests.support.worker_replay import PARTITIONS, Reader, Record, Recorder


class OneBatchReader(Reader):
    """Hands out ``batch`` once, starting ``on_first`` just before, then empty polls."""

    def __init__(self, batch: list[Record], on_first: object) -> None:
        super().__init__()
        self.batch, self.on_first, self.polls = batch, on_first, 0

    async def poll(self) -> list[Record]:
        self.polls += 1
        if self.polls == 1:
            asyncio.ensure_future(self.on_first)  # type: ignore[arg-type]
            return self.batch
        await asyncio.sleep(0.01)
        return []


def test_a_tick_waiting_for_the_lock_goes_in_after_one_slice() -> None:
    from streams.worker import build

    settings = Settings.load(
        profile="dev",
        clock="event",
        worker_id="worker-slices",
        worker_checkpoint_interval_ms=600_000,
    )
    _app, shell = build(settings)
    shell.clients._output = Recorder()  # type: ignore[assignment]
    codec = shell.codec
    offsets = [0] * PARTITIONS
    batch: list[Record] = []
    for click in generate(50, 3 * SLICE, 3):
        key = click.user_id.encode()
        partition = zlib.crc32(key) % PARTITIONS
        value = codec.encode("ClickEvent", click.to_record())
        batch.append(Record(key, value, offsets[partition], partition))
        offsets[partition] += 1
    assert len(batch) == 3 * SLICE
    seen: list[int] = []  # events processed when the tick got the lock

    async def tick() -> None:
        async with shell.busy:
            seen.append(shell.stats.events)
            await shell.ticks.advance_partition(0, 0)

    async def run() -> None:
        shell.clients._reader = OneBatchReader(batch, tick())  # type: ignore[assignment]
        reading = asyncio.ensure_future(shell.pipeline.run())
        while shell.stats.events < len(batch):
            await asyncio.sleep(0.01)
        await shell.pipeline.stop()
        await reading

    asyncio.run(run())
    assert seen and 0 < seen[0] < len(batch)
    assert seen[0] <= SLICE
