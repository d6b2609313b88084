"""The worker's GC policy: every collector pass is timed into ``nudgeflow_gc_pause_seconds``,
survivors of a checkpoint interval are frozen out of later passes, and uninstalling restores the
process's thresholds."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from processors import metrics
from streams.gcpolicy import WORKER_GC_THRESHOLDS, GcPolicy


def _passes(generation: int) -> float:
    return metrics.sample_value("nudgeflow_gc_pause_seconds_count", {"generation": str(generation)})


@pytest.fixture
def policy() -> Iterator[GcPolicy]:
    thresholds = gc.get_threshold()
    policy = GcPolicy()
    try:
        yield policy
    finally:
        policy.uninstall()
        gc.enable()
        gc.set_threshold(*thresholds)


def test_every_pass_is_timed_by_generation(policy: GcPolicy) -> None:
    before = [_passes(g) for g in range(3)]
    total = metrics.sample_value("nudgeflow_gc_pause_seconds_sum", {"generation": "2"})
    policy.install()
    assert gc.get_threshold() == WORKER_GC_THRESHOLDS
    gc.disable()  # only the passes below (callbacks still see explicit collections)
    passes = policy.passes
    gc.collect(0)
    gc.collect(2)
    assert _passes(0) == before[0] + 1
    assert _passes(2) == before[2] + 1
    assert policy.passes == passes + 2
    assert policy.longest_s > 0
    assert metrics.sample_value("nudgeflow_gc_pause_seconds_sum", {"generation": "2"}) > total
    assert "nudgeflow_gc_pause_seconds_count" in metrics.exposed_names()


def test_settle_freezes_survivors_and_uninstall_stops_timing(policy: GcPolicy) -> None:
    thresholds = gc.get_threshold()
    ours = gc.get_freeze_count() == 0
    policy.install()
    frozen = gc.get_freeze_count()
    survivors = [[i] for i in range(1000)]  # tracked containers made after install
    policy.settle()
    assert gc.get_freeze_count() >= frozen + len(survivors)
    assert policy.settled == 1
    policy.uninstall()
    passes = policy.passes
    gc.collect(0)
    assert policy.passes == passes  # no longer timed
    assert gc.get_threshold() == thresholds
    if ours:  # nothing was frozen before install: everything is scanned again
        assert gc.get_freeze_count() == 0


def test_the_read_loop_and_checkpoints_make_no_reference_cycles() -> None:
    """What the worker's GC thresholds rely on: the batch path and the checkpoints leave no
    cyclic garbage behind (it would be frozen, never collected), however many events pass."""
    import asyncio
    import zlib

    from processors.settings import Settings
    from processors.simulate import generate
    from streams.worker import build
    from tests.support.worker_replay import PARTITIONS, Reader, Record, Recorder

    settings = Settings.load(profile="dev", clock="event", worker_id="worker-cycles")
    _app, shell = build(settings)
    shell.clients._output = Recorder()  # type: ignore[assignment]
    shell.clients._reader = Reader()  # type: ignore[assignment]
    offsets = [0] * PARTITIONS
    records: list[Record] = []
    for click in generate(2_000, 8_000, 5):
        key = click.user_id.encode()
        partition = zlib.crc32(key) % PARTITIONS
        value = shell.codec.encode("ClickEvent", click.to_record())
        records.append(Record(key, value, offsets[partition], partition))
        offsets[partition] += 1

    async def replay(batch: list[Record]) -> None:
        for start in range(0, len(batch), 500):
            await shell.pipeline.process(batch[start : start + 500])  # type: ignore[arg-type]
            if start % 2_000 == 0:
                await shell.clients.checkpointer.checkpoint()
        await shell.clients.checkpointer.checkpoint()

    loop = asyncio.new_event_loop()
    enabled = gc.isenabled()
    gc.disable()
    try:
        loop.run_until_complete(replay(records[:1_000]))  # first use: caches, metrics children
        gc.collect()
        loop.run_until_complete(replay(records[1_000:]))
        found = gc.collect()
    finally:
        loop.close()
        if enabled:
            gc.enable()
    assert shell.stats.events == len(records)
    assert shell.stats.decisions > 0
    assert found < 100, f"{found} objects in reference cycles after {len(records) - 1_000} events"
