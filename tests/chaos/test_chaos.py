"""``make chaos``: a 100k-event replay through 2 workers and 2 dispatchers on Apache Kafka under
every fault below, one after the other on the same run (docs/chaos.md says what each proves):
1. ten SIGKILLs, every 4-8 s, of a random worker or dispatcher, each restarted at once;
2. redis-server SIGKILLed and restarted 5 s later (AOF, fsync always): the dispatchers wait
   without a gateway call and without exiting;
3. the broker unreachable for 20 s (every connection cut, new ones blackholed);
4. the broker's JVM frozen for 10 s (SIGSTOP, then SIGCONT);
5. the broker's JVM SIGKILLed and restarted 10 s later on the same log directory;
6. a gateway fault window of 600 requests: throttling, 429, 5xx, a few permanent errors,
   answers lost after the request arrived (dropped, too late; half of them after the gateway
   took the text), and 2 s of refused connections then 2 s of reset TLS handshakes;
7. a 10x burst of the remaining events (slow consumer: the backlog waits in Kafka), with the
   RSS of every process sampled.
Then end of input, and the verdict: decisions equal ``run_backtest`` on the same events, every
decision has a final outcome (``failed: unknown_after_*`` is one), the gateway took each
decision's ``client-ref`` at most once and was never asked again after a lost answer, never
more than 30 requests in any second, no request while Redis was down, every gateway failure
on sms-dlq with its reason (the ambiguous ones not), and memory bounded through the burst. The
last line printed is ``kills=… lost=0 duplicates=0 redis_restarts=… broker_outages=…
broker_crashes=… broker_freezes=… gateway_faults=… dlq=…``.
Scale with ``NUDGEFLOW_CHAOS_EVENTS`` (default 100000) and ``NUDGEFLOW_CHAOS_KILLS`` (10).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.chaos.harness import Chaos, write_summary

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800)]

EVENTS = int(os.environ.get("NUDGEFLOW_CHAOS_EVENTS", "100000"))
KILLS = int(os.environ.get("NUDGEFLOW_CHAOS_KILLS", "10"))
SEED = int(os.environ.get("NUDGEFLOW_CHAOS_SEED", "7"))
FAULT_PHASE_S = 300.0  # the steady feed is spread over about this long (steps 1-4 take ~200 s)
STEADY_SHARE = 0.7  # of the events fed at the steady rate; the rest is the 10x burst
BURST_FACTOR = 10
# Memory through the burst: the backlog must stay in Kafka. What a process may hold is bounded
# by its prefetch (librdkafka's queued.max.messages.kbytes, Faust's stream buffer), the
# dispatcher's in-flight cap (64) and, for the worker, the per-user state of the users the burst
# brings in, none of which grows with the size of the backlog.
DISPATCHER_BURST_GROWTH_MB = 100
WORKER_BURST_GROWTH_MB = 250


def test_chaos_replay_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    chaos = Chaos(
        tmp_path / "chaos",
        events=EVENTS,
        users=max(200, EVENTS // 20),
        seed=SEED,
        workers=2,
        dispatchers=2,
    )
    steady = int(STEADY_SHARE * EVENTS)
    rate = max(50.0, steady / FAULT_PHASE_S)
    say = chaos.timeline.say
    failure: Exception | None = None
    try:
        chaos.start()
        chaos.rss.phase = "steady"
        chaos.feeder.feed(rate=rate, limit=steady)
        say(f"feeding {steady} events at {rate:.0f}/s")
        chaos.wait_worker_progress()
        for _ in range(KILLS):
            time.sleep(rng.uniform(4.0, 8.0))
            chaos.kill()
        # Each next fault starts on a settled pipeline, so its effects can be told apart.
        backlog = int(20 * rate)  # "settled": at most ~20 s of input not yet processed
        chaos.wait_stable(timeout_s=240, max_lag=backlog)
        chaos.restart_redis(down_s=5.0)
        chaos.wait_stable(timeout_s=240, max_lag=backlog)
        chaos.broker_outage(20.0)
        chaos.wait_stable(timeout_s=240, max_lag=backlog)
        chaos.broker_freeze(10.0)
        chaos.wait_stable(timeout_s=240, max_lag=backlog)
        chaos.broker_crash(down_s=10.0)
        chaos.wait_stable(timeout_s=240, max_lag=backlog)
        chaos.gateway_faults(600, wait_s=120, connect_s=2.0)
        while chaos.feeder.sent < steady:
            chaos.check_threads()
            time.sleep(0.5)
        chaos.wait_caught_up(timeout_s=300, settle_s=5)
        say(f"steady part done; burst: {EVENTS - steady} events at {BURST_FACTOR * rate:.0f}/s")
        chaos.rss.phase = "burst"
        chaos.feeder.feed(rate=BURST_FACTOR * rate, limit=EVENTS)
        peak_lag = 0
        while not chaos.feeder.done:
            chaos.check_threads()
            lag = chaos.lags()[0]
            peak_lag = max(peak_lag, lag or 0)
            time.sleep(1.0)
        chaos.wait_caught_up(timeout_s=600, settle_s=5)
        say(f"burst absorbed (peak worker backlog {peak_lag} events)")
        chaos.rss.phase = "drain"
        chaos.end_of_input(timeout_s=600)
    except Exception as exc:  # noqa: BLE001 - a stall still gets its summary, then fails
        failure = exc
    finally:
        chaos.stop()
    report = chaos.verdict(failure)
    rss = report.rss
    if (
        rss.get("dispatcher_burst", 0)
        > rss.get("dispatcher_steady", 0) + DISPATCHER_BURST_GROWTH_MB
    ):
        report.problems.append(f"dispatcher memory grew in the burst: {rss}")
    if rss.get("worker_burst", 0) > rss.get("worker_steady", 0) + WORKER_BURST_GROWTH_MB:
        report.problems.append(f"worker memory grew in the burst: {rss}")
    write_summary(report, chaos.timeline)
    assert not report.problems, report.problems
    assert report.kills == KILLS
    assert (report.redis_restarts, report.broker_outages) == (1, 1)
    assert (report.broker_freezes, report.broker_crashes) == (1, 1)
    assert report.gateway_faults > 100 and report.dlq > 0
    assert report.statuses["sent"] > 0
