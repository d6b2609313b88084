"""The worker's GC policy: every collector pass is timed into ``nudgeflow_gc_pause_seconds``,
survivors of a checkpoint interval are frozen out of later passes, and uninstalling restores the
process's thresholds."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from processors import metrics
from processors.collector import GC_THRESHOLDS
from streams.gcpolicy import GcPolicy


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
    assert gc.get_threshold() == GC_THRESHOLDS
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
