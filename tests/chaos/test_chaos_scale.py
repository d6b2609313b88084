"""Scaling out and in under load: a 100k-event replay on 12 partitions while workers go
1 → 3 → 1 and dispatchers 1 → 3 → 1 (processes started, then stopped with SIGTERM), each change
once the groups' output flows again after the one before.

The verdict is the chaos suite's (tests/chaos/harness.py): decisions equal the backtest, one
final outcome per decision (none published twice), no text twice, the gateway limit (30 a
second) held across the dispatchers, no text inside quiet hours or past a cap, and no process
exited on its own. Each rebalance's pause, the longest gap in the output of the group that
changed (the worker's ``user_state`` changelog and decisions; the dispatchers' outcomes), is in
the details and its maximum on the summary line: ``… partitions=12 workers=1>3>1
dispatchers=1>3>1 longest_pause_s=…``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.chaos.harness import Chaos, write_summary

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1200)]

EVENTS = int(os.environ.get("NUDGEFLOW_CHAOS_SCALE_EVENTS", "100000"))
SEED = int(os.environ.get("NUDGEFLOW_CHAOS_SEED", "7"))
PARTITIONS = 12
FEED_S = 300.0  # the replay is spread over about this long (at least), the changes within it
RESERVE = 0.35  # share of the events held back until the scale-out is done: for the scale-in
BASELINE_S = 10.0  # output timed before the first change, for comparison
MIN_BETWEEN_S = 8.0  # at least this long between two changes


def test_scaling_out_and_in_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    chaos = Chaos(
        tmp_path / "chaos",
        events=EVENTS,
        users=max(200, EVENTS // 20),
        seed=SEED,
        workers=1,
        dispatchers=1,
        partitions=PARTITIONS,
    )
    say = chaos.timeline.say
    failure: Exception | None = None
    baseline: dict[str, float] = {}
    counts = {"worker": [1], "dispatcher": [1]}
    try:
        chaos.start()
        chaos.rss.phase = "steady"
        rate = EVENTS / FEED_S
        held = int(RESERVE * EVENTS)
        chaos.feeder.feed(rate=rate, limit=EVENTS - held)
        say(f"feeding {EVENTS - held} events at {rate:.0f}/s on {PARTITIONS} partitions")
        chaos.wait_worker_progress()
        chaos.start_pulse()
        assert chaos.pulse is not None
        chaos.wait_output("worker", min_s=BASELINE_S)
        t = chaos.timeline.now()
        now = time.time()
        baseline = {r: chaos.pulse.longest_gap(r, now - BASELINE_S, now) for r in counts}
        say(f"baseline: longest gaps in the last {BASELINE_S:g}s {baseline} (at {t:.0f}s)")
        # Interleaved, so both groups change while the replay is fed: +w +d +w +d -w -d -w -d.
        for _ in range(2):
            for role in ("worker", "dispatcher"):
                chaos.add(role)
                counts[role].append(len(chaos.active(role)))
                chaos.wait_output(role, min_s=MIN_BETWEEN_S)
        # The rest of the replay, at the same rate: the scale-in happens under load too.
        chaos.feeder.feed(rate=rate, limit=EVENTS)
        say(f"scaled out with {chaos.feeder.sent} events fed; feeding the other {held}")
        for _ in range(2):
            for role in ("worker", "dispatcher"):
                chaos.retire(chaos.active(role)[-1])
                counts[role].append(len(chaos.active(role)))
                chaos.wait_output(role, min_s=MIN_BETWEEN_S)
        if not chaos.feeder.done:
            say(f"every change made with {chaos.feeder.sent} of {EVENTS} events fed")
        else:
            say("the replay was fed completely before the last change")
        chaos.wait_caught_up(timeout_s=600, settle_s=5)
        chaos.end_of_input(timeout_s=300)
    except Exception as exc:  # noqa: BLE001 - a stall still gets its summary, then fails
        failure = exc
    finally:
        chaos.stop()
    report = chaos.verdict(failure)
    pauses = chaos.rebalance_pauses() if chaos.pulse is not None else []
    report.extra["partitions"] = str(PARTITIONS)
    for role in ("worker", "dispatcher"):
        seen = counts[role]
        report.extra[f"{role}s"] = f"{seen[0]}>{max(seen)}>{seen[-1]}"
    busy = [p for what, p in pauses if not what.endswith("(idle)")]
    report.extra["longest_pause_s"] = f"{max(busy, default=0.0):.1f}"
    report.notes.append(
        "rebalance pauses (longest output gap after each change): "
        + ", ".join(f"{what} {p:.1f}s" for what, p in pauses)
        + " | baseline "
        + ", ".join(f"{r} {g:.1f}s" for r, g in baseline.items())
    )
    if report.repeated_outcomes:
        report.problems.append(f"{report.repeated_outcomes} final outcomes published again")
    if report.crash_restarts:
        report.problems.append(f"{report.crash_restarts} processes exited on their own")
    write_summary(report, chaos.timeline)
    assert not report.problems, report.problems
    assert counts == {"worker": [1, 2, 3, 2, 1], "dispatcher": [1, 2, 3, 2, 1]}, counts
    assert report.statuses["sent"] > 100
