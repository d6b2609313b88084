"""Time moves between slices of a batch: the read loop applies the newest tick of each partition
after every slice and lets go of the worker's lock, so neither a due timer nor anything else
that needs the lock waits for a whole batch."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Coroutine
from typing import Any

from processors import metrics
from processors.settings import Settings
from processors.simulate import generate
from streams.agents import TriggerShell
from streams.pipeline import SLICE
from tests.support.worker_replay import PARTITIONS, Reader, Record, Recorder


class OneBatchReader(Reader):
    """Hands out ``batch`` once, starting ``on_first`` just before, then empty polls."""

    def __init__(self, batch: list[Record], on_first: Coroutine[Any, Any, None]) -> None:
        super().__init__()
        self.batch, self.on_first, self.polls = batch, on_first, 0

    async def poll(self) -> list[Record]:
        self.polls += 1
        if self.polls == 1:
            asyncio.ensure_future(self.on_first)
            return self.batch
        await asyncio.sleep(0.01)
        return []


def _shell(worker_id: str) -> TriggerShell:
    from streams.worker import build

    settings = Settings.load(
        profile="dev", clock="live", worker_id=worker_id, worker_checkpoint_interval_ms=600_000
    )
    _app, shell = build(settings)
    shell.clients._output = Recorder()  # type: ignore[assignment]
    return shell


def _batch(shell: TriggerShell, n: int) -> list[Record]:
    offsets = [0] * PARTITIONS
    batch: list[Record] = []
    for click in generate(50, n, 3):
        key = click.user_id.encode()
        partition = zlib.crc32(key) % PARTITIONS
        value = shell.codec.encode("ClickEvent", click.to_record())
        batch.append(Record(key, value, offsets[partition], partition))
        offsets[partition] += 1
    return batch


def test_a_tick_moves_time_after_one_slice_of_a_large_batch() -> None:
    shell = _shell("worker-slices")
    batch = _batch(shell, 3 * SLICE)
    tick_ms = shell.clock.now_ms()
    lateness_ms = shell.ticks.lateness_ms
    seen: list[tuple[int, int | None]] = []  # (events processed, partition 0's watermark)

    async def during_the_first_slice() -> None:
        shell.ticks.pending[0] = tick_ms  # what the ticks agent keeps when a tick arrives
        async with shell.busy:
            seen.append((shell.stats.events, shell.steps.tick_watermarks.get(0)))

    async def run() -> None:
        shell.clients._reader = OneBatchReader(batch, during_the_first_slice())  # type: ignore[assignment]
        reading = asyncio.ensure_future(shell.pipeline.run())
        while shell.stats.events < len(batch):
            await asyncio.sleep(0.01)
        await shell.pipeline.stop()
        await reading

    asyncio.run(run())
    assert seen == [(SLICE, tick_ms - lateness_ms)]
    assert shell.ticks.pending == {}


def test_apply_moves_owned_partitions_to_their_newest_tick_only() -> None:
    shell = _shell("worker-ticks")
    shell.clients._reader = Reader()  # type: ignore[assignment]
    now = shell.clock.now_ms()
    delays = metrics.sample_value("nudgeflow_tick_delay_seconds_count")
    shell.ticks.pending.update({0: now - 500, 7: now})  # 7: not a partition this worker reads

    asyncio.run(shell.ticks.apply())
    assert shell.steps.tick_watermarks == {0: now - 500 - shell.ticks.lateness_ms}
    assert shell.ticks.pending == {}
    assert metrics.sample_value("nudgeflow_tick_delay_seconds_count") == delays + 1
    assert metrics.sample_value("nudgeflow_tick_delay_seconds_sum") >= 0.5
