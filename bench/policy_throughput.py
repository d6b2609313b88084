"""Dispatcher policy throughput: decisions fully suppressed by frequency caps (no gateway call).

Issue 7's target is >= 5,000 decisions/s per process. One in-process
:class:`processors.dispatcher.Dispatcher` (the real shell: consumer, Redis store with its Lua cap
check, outcome producer, commits) drains a backlog of decisions for opted-in users whose global
cap is already used up (one reserved send each), so every decision runs the ordered policy up
to the cap check, is suppressed, and produces its ``SmsOutcome``. The rate is measured from the
dispatcher's decision counter between 10% and 90% of the backlog, and so are the CPU time of this
process (dispatcher thread, librdkafka threads) and of redis-server per decision: on a shared
machine the rate moves with the neighbours' load, the CPU figures much less.

Prints ``policy_decisions``, ``policy_capped``, ``policy_per_s``, ``policy_cpu_us`` and
``policy_redis_cpu_us`` (CPU microseconds per decision).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from _common import EXAMPLE_CAMPAIGNS, FakeGateway, bench_settings, write_contacts
from confluent_kafka import Producer
from trigger_throughput import BenchError, run_main, say

from processors.collector import settle_collector
from processors.commands.contacts import import_contacts
from processors.core.campaign import load_campaigns
from processors.core.decision import Decision
from processors.devstack import EmbeddedStack, create_topics
from processors.dispatcher import Dispatcher
from schemas.codec import Codec


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; 0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed by kind: ``kafka`` (librdkafka's
    ``rdk:*`` threads) and ``python`` (the dispatcher's and the benchmark's own)."""
    out = {"kafka": 0.0, "python": 0.0}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out["kafka" if name.startswith("rdk:") else "python"] += cpu
    return out


def run(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str]]:
    stack = EmbeddedStack()
    state_dir = tmp / "stack"
    info = stack.up(state_dir)
    dispatcher: Dispatcher | None = None
    thread: threading.Thread | None = None
    try:
        settings = bench_settings(state_dir, clock="live", campaigns_file=EXAMPLE_CAMPAIGNS)
        create_topics(info.bootstrap_servers, settings)
        users = [f"p{i:05d}" for i in range(args.users)]
        import_contacts(write_contacts(tmp / "contacts.jsonl", users), settings, echo_errors=False)
        now = int(time.time() * 1000)
        total = args.users * args.per_user
        codec = Codec(settings.schema_registry_url)
        producer = Producer({**settings.kafka_common(), "linger.ms": 20})
        for i in range(total):
            user = users[i % args.users]
            d = Decision(f"pd-{i}", "signup-confirm", user, now, (f"pe-{i}",), now)
            value = codec.encode("TriggerDecision", d.to_record())
            while True:
                try:
                    producer.produce(settings.topic_decisions, key=user.encode(), value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(30):
            raise BenchError("the decision backlog was not delivered")
        dispatcher = Dispatcher(
            settings, load_campaigns(EXAMPLE_CAMPAIGNS), FakeGateway(), rate_per_s=30.0
        )
        for user in users:  # use up each user's global cap (max 1 per 4 h)
            seed = Decision(f"seed-{user}", "signup-confirm", user, now, ("seed",), now)
            dispatcher.store.check_caps(seed, dispatcher.policy.global_rules, now, True)
        settle_collector()  # as `nudgeflow dispatcher` does before it runs
        say(f"{total} decisions for {args.users} capped users; dispatching")
        errors: list[BaseException] = []

        def target() -> None:
            try:
                assert dispatcher is not None
                dispatcher.run()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        marks: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        while dispatcher.stats.decisions < total:
            if errors:
                raise BenchError(f"dispatcher failed: {errors[0]!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"{dispatcher.stats.decisions} of {total} decisions in time")
            seen = dispatcher.stats.decisions
            for name, frac in (("lo", 0.1), ("hi", 0.9)):
                if name not in marks and seen >= frac * total:
                    marks[name] = time.perf_counter()
                    marks[f"{name}_n"] = seen
                    marks[f"{name}_cpu"] = time.process_time()
                    marks[f"{name}_redis"] = _cpu_s(info.redis_pid)
                    marks[f"{name}_broker"] = _cpu_s(info.broker_pid)
                    threads = _thread_cpu_s()
                    marks[f"{name}_kafka"], marks[f"{name}_py"] = (
                        threads["kafka"],
                        threads["python"],
                    )
            time.sleep(0.01)
        if "hi" not in marks:
            marks["hi"], marks["hi_n"] = time.perf_counter(), dispatcher.stats.decisions
            marks["hi_cpu"], marks["hi_redis"] = time.process_time(), _cpu_s(info.redis_pid)
            marks["hi_broker"] = _cpu_s(info.broker_pid)
            threads = _thread_cpu_s()
            marks["hi_kafka"], marks["hi_py"] = threads["kafka"], threads["python"]
        decided = max(1.0, marks["hi_n"] - marks["lo_n"])
        rate = decided / max(1e-9, marks["hi"] - marks["lo"])
        cpu_us = (marks["hi_cpu"] - marks["lo_cpu"]) / decided * 1e6
        redis_us = (marks["hi_redis"] - marks["lo_redis"]) / decided * 1e6
        broker_us = (marks["hi_broker"] - marks["lo_broker"]) / decided * 1e6
        kafka_us = (marks["hi_kafka"] - marks["lo_kafka"]) / decided * 1e6
        py_us = (marks["hi_py"] - marks["lo_py"]) / decided * 1e6
        outcomes = dispatcher.stats.outcomes
        capped = outcomes.get("suppressed:frequency_cap", 0)
        say(
            f"{rate:,.0f} decisions/s; CPU per decision {cpu_us:.0f} us here, {redis_us:.0f} us "
            f"in redis-server, {broker_us:.0f} us in the broker; of this process's, "
            f"{py_us:.0f} us in Python threads, {kafka_us:.0f} us in librdkafka's; "
            f"outcomes {dict(outcomes)}"
        )
        if args.redis_stats:  # where redis-server's time goes (per decision, whole run)
            stats = dispatcher.redis.info("commandstats")
            for name, row in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:12]:
                say(f"  {name}: {row['calls'] / total:.2f} calls, {row['usec'] / total:.1f} us")
        if capped < 0.99 * total:
            raise BenchError(f"only {capped} of {total} decisions were suppressed by caps")
        return [
            ("policy_decisions", str(total)),
            ("policy_capped", str(capped)),
            ("policy_per_s", f"{rate:.0f}"),
            ("policy_cpu_us", f"{cpu_us:.0f}"),
            ("policy_redis_cpu_us", f"{redis_us:.0f}"),
            ("policy_py_cpu_us", f"{py_us:.0f}"),
            ("policy_librdkafka_cpu_us", f"{kafka_us:.0f}"),
            ("policy_broker_cpu_us", f"{broker_us:.0f}"),
        ]
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        if thread is not None:
            thread.join(30)
        stack.down(state_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=500, help="capped users (500)")
    parser.add_argument("--per-user", type=int, default=10, help="decisions per user (10)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to drain (120)")
    parser.add_argument(
        "--redis-stats", action="store_true", help="print Redis commandstats per decision"
    )
    return run_main("policy_throughput", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
