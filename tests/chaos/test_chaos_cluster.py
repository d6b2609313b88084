"""The chaos suite on a Redis Cluster: a replay through 2 workers and 2 dispatchers whose Redis
is a local cluster (3 masters, 3 replicas; ``redis+cluster://``), and mid-replay the master
serving the gateway's shared rate-limit key is SIGKILLed. Its replica takes over (the cluster's
node timeout, 2 s, then the election); the dispatchers ride through: the calls to the dead
master's slots fail (connection errors, then ``CLUSTERDOWN``/``MOVED`` until the client has the
new slot map), the dispatcher waits them out as a Redis outage and goes on, without exiting.

The verdict is the chaos suite's (tests/chaos/harness.py): decisions equal the backtest, one
final outcome per decision, no text twice and none resent after a lost answer, never more than
30 requests in a second, no text inside quiet hours or past a cap; and no process exited. The
summary line ends with ``redis_failovers=1 takeover_s=…``.
Scale with ``NUDGEFLOW_CHAOS_CLUSTER_EVENTS`` (default 30000).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from processors.redis import DEFAULT_PREFIX
from tests.chaos.harness import Chaos, write_summary

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

EVENTS = int(os.environ.get("NUDGEFLOW_CHAOS_CLUSTER_EVENTS", "30000"))
SEED = int(os.environ.get("NUDGEFLOW_CHAOS_SEED", "7"))
FEED_S = 120.0  # the replay is spread over about this long
KILL_AT = 0.4  # share of the events fed when the master is killed
# The dispatchers' shared gateway budget (processors/redis/rate_limit.py), hash-tagged on a
# cluster: every send books it, so its master's death is met by every dispatcher at once.
RATE_KEY = f"{{{DEFAULT_PREFIX}ratelimit:gateway}}"


def redis_pauses(chaos: Chaos) -> int:
    """How often a dispatcher logged that it paused for Redis (an outage it waited out)."""
    return sum(
        s.log.read_text(errors="replace").count("redis unreachable")
        for s in chaos.by_role("dispatcher")
    )


def test_a_redis_cluster_failover_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    chaos = Chaos(
        tmp_path / "chaos",
        events=EVENTS,
        users=max(200, EVENTS // 20),
        seed=SEED,
        workers=2,
        dispatchers=2,
        redis_cluster=True,
    )
    say = chaos.timeline.say
    failure: Exception | None = None
    try:
        chaos.start()
        chaos.rss.phase = "steady"
        rate = EVENTS / FEED_S
        chaos.feeder.feed(rate=rate, limit=EVENTS)
        say(f"feeding {EVENTS} events at {rate:.0f}/s")
        chaos.wait_worker_progress()
        while chaos.feeder.sent < KILL_AT * EVENTS:
            chaos.check_threads()
            time.sleep(0.5)
        assert chaos.fake is not None
        sent_before = len(chaos.fake.requests)
        chaos.fail_redis_master(RATE_KEY)
        while len(chaos.fake.requests) <= sent_before + 30:
            chaos.check_threads()  # the dispatchers send again after the takeover
            time.sleep(0.5)
        say(f"sending again: {len(chaos.fake.requests) - sent_before} requests since the kill")
        chaos.wait_caught_up(timeout_s=400, settle_s=5)
        chaos.end_of_input(timeout_s=300)
    except Exception as exc:  # noqa: BLE001 - a stall still gets its summary, then fails
        failure = exc
    finally:
        chaos.stop()
    report = chaos.verdict(failure)
    takeover = max(chaos.redis_failovers, default=0.0)
    report.extra["redis_failovers"] = str(len(chaos.redis_failovers))
    report.extra["takeover_s"] = f"{takeover:.1f}"
    pauses = redis_pauses(chaos)
    report.notes.append(f"redis cluster: dispatcher pauses for Redis {pauses}")
    if report.crash_restarts:
        report.problems.append(f"{report.crash_restarts} process exits (they should ride through)")
    write_summary(report, chaos.timeline)
    assert not report.problems, report.problems
    assert len(chaos.redis_failovers) == 1
    assert report.statuses["sent"] > 100
