"""Time moves between slices of a batch: the read loop applies the newest tick of each partition
after every slice and lets go of the worker's lock, so neither a due timer nor anything else
that needs the lock waits for a whole batch."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from processors import metrics
from processors.settings import Settings
from processors.simulate import generate
from streams.agents import TriggerShell
from streams.pipeline import SLICE
from streams.ticks import encode_tick
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


class Tick:
    """What the ticks agent reads of a Faust event: its partition and value."""

    def __init__(self, partition: int, value: bytes) -> None:
        self.message = self
        self.partition, self.value = partition, value


class TickStream:
    """A Faust stream of ticks as the ticks agent iterates it; at each ``None`` the read loop
    gets a turn (``between``) before the next tick."""

    def __init__(self, ticks: list[Tick | None], between: Callable[[], Awaitable[None]]) -> None:
        self.ticks, self.between = ticks, between

    async def events(self) -> AsyncIterator[Tick]:
        for tick in self.ticks:
            if tick is None:
                await self.between()
            else:
                yield tick


def test_the_agent_keeps_the_newest_tick_of_each_partition_across_applies() -> None:
    shell = _shell("worker-agent")
    shell.clients._reader = Reader()  # type: ignore[assignment]
    ticks, lateness_ms = shell.ticks, shell.ticks.lateness_ms
    now = shell.clock.now_ms()
    older, newest, later = encode_tick(now - 300), encode_tick(now - 100), encode_tick(now)
    watermarks: list[dict[int, int]] = []

    async def read_loop_turn() -> None:
        await ticks.apply()
        watermarks.append(dict(shell.steps.tick_watermarks))

    stream = TickStream(
        [
            Tick(0, older),
            Tick(0, newest),
            Tick(0, older),
            Tick(1, b"x"),
            None,
            Tick(1, later),
            None,
        ],
        read_loop_turn,
    )
    asyncio.run(ticks.agent(stream))  # type: ignore[arg-type]
    first = {0: now - 100 - lateness_ms}
    assert watermarks == [first, {**first, 1: now - lateness_ms}]
    assert shell.stats.ticks == 4  # the malformed one is not counted


def test_the_agent_applies_a_tick_itself_only_while_the_lock_is_free() -> None:
    shell = _shell("worker-agent-lock")
    shell.clients._reader = Reader()  # type: ignore[assignment]
    ticks, lateness_ms = shell.ticks, shell.ticks.lateness_ms
    now = shell.clock.now_ms()

    async def nothing() -> None:
        return None

    async def run() -> None:
        async with shell.busy:  # the read loop is processing a slice
            await ticks.agent(TickStream([Tick(0, encode_tick(now))], nothing))  # type: ignore[arg-type]
            assert shell.steps.tick_watermarks == {} and ticks.pending == {0: now}
        await ticks.agent(TickStream([Tick(1, encode_tick(now))], nothing))  # type: ignore[arg-type]

    asyncio.run(run())
    assert shell.steps.tick_watermarks == {0: now - lateness_ms, 1: now - lateness_ms}
    assert ticks.pending == {}
