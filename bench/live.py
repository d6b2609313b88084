"""Live-clock figures of the trigger worker: decision and send latency, timer lateness, memory.

One embedded stack, one worker (live clock, every example campaign plus an absence campaign of
``--absence-s``, changelog on, allowed lateness 2 s, state TTL 10 s via
``NUDGEFLOW_STATE_TTL_S``) and one in-process dispatcher whose gateway answers after 20 ms
(``_common.FakeGateway``). Three phases, each waiting for the worker to catch up (committed
offsets) before the next:

1. **Latency** (``--rate`` events/s for ``--latency-s``, default 1,000/s for 10 s): page views
   of returning users, ``points_earned`` (gold) of users without contacts (decided, then
   suppressed by the dispatcher) and ``event_signup`` of opted-in users (decided and texted).
   ``decision_p99_ms``: the decision's Kafka CreateTime minus the event time (events are stamped
   when produced). ``send_p99_ms``: the fake gateway's arrival time minus the event time, for the
   texted signups (1% of the events, well under the 30/s gateway limit).
2. **Timers** (``--episodes`` at ``--episode-rate`` with a ``--absence-s`` window, default
   100,000 at 2,000/s with 60 s): ``bench_start`` events of distinct users, each opening an
   absence timer; the window is longer than the opening, so all are open when the first fires,
   and they then come due at the rate they were opened.
   ``timer_lateness_p99_s``: the decision's CreateTime minus (deadline + allowed lateness).
3. **Soak** (``--soak-rate`` new users/s for ``--soak-s``, default 5,000/s for 200 s = 1,000,000
   users): one page view per new user; with the 10 s TTL the number of live users levels off.
   ``rss_growth``: the worker's RSS at the end over its RSS a third into the soak;
   ``soak_lag_events``: soak events the worker had not checkpointed when the soak ended.

Every phase produces with librdkafka's default 5 ms linger (the event time is stamped before
it, so the latency figures include that wait).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    DecisionWatcher,
    FakeGateway,
    bench_settings,
    percentile,
    rss_bytes,
    write_campaigns,
    write_contacts,
)
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from trigger_throughput import BenchError, Worker, run_main, say

from processors.commands.contacts import import_contacts
from processors.core.campaign import load_campaigns
from processors.core.events import ClickEvent
from processors.devstack import EmbeddedStack, create_topics
from processors.dispatcher import Dispatcher
from processors.settings import Settings
from schemas.codec import Codec
from streams.reader import offsets_group

LATENESS_S = 2.0
TTL_MS = 10_000
SETTLE_TIMEOUT_S = 120.0


def absence_campaign(after_s: float) -> dict[str, Any]:
    """The timers phase's campaign: ``bench_start`` opens an episode that fires after_s later."""
    return {
        "id": "bench-absence",
        "trigger": {"type": "absence", "start": ["bench_start"], "cancel": ["bench_stop"],
                    "after": f"{after_s:g}s"},
        "message": {"template": "Come back!"},
    }  # fmt: skip


IMMEDIATE = ("signup-confirm", "loyalty-gold")
LINGER_MS = 5


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Events:
    """Encodes and produces clickstream events stamped with the current time."""

    def __init__(self, settings: Settings, linger_ms: int = LINGER_MS) -> None:
        self.topic = settings.topic_clickstream
        self.codec = Codec(settings.schema_registry_url)
        self.producer = Producer({**settings.kafka_common(), "linger.ms": linger_ms})
        self.n = 0

    def send(self, user: str, event_type: str, props: dict[str, str] | None = None) -> None:
        self.n += 1
        ev = ClickEvent(f"b-{self.n}", user, event_type, now_ms(), f"{user}-s", props or {})
        value = self.codec.encode("ClickEvent", ev.to_record())
        while True:
            try:
                self.producer.produce(self.topic, key=user.encode(), value=value)
                break
            except BufferError:
                self.producer.poll(0.01)
        self.producer.poll(0)

    def flush(self) -> None:
        if self.producer.flush(30):
            raise BenchError("clickstream events were not delivered")


def paced(rate: float, seconds: float, emit: Any) -> int:
    """Call ``emit(i)`` for i in 0..rate*seconds-1, the i-th at ``start + i / rate`` (late calls
    catch up at once, so the count is exact however slow one call is); returns the count."""
    total = int(rate * seconds)
    start = time.monotonic()
    i = 0
    while i < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while i < due:
            emit(i)
            i += 1
        if i < total:
            time.sleep(max(0.0, min(0.01, start + i / rate - time.monotonic())))
    return total


def wait_for(what: str, check: Any, timeout_s: float, worker: Worker, describe: Any = None) -> None:
    """Poll ``check()`` until true; on a timeout the error says ``describe()`` (progress)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        worker.check_alive()
        if time.monotonic() > deadline:
            state = f" ({describe()})" if describe is not None else ""
            raise BenchError(
                f"timed out after {timeout_s:.0f} s waiting for {what}{state}; worker log:\n"
                f"{worker.log_tail(5)}"
            )
        time.sleep(0.1)


class Progress:
    """The worker group's committed clickstream offsets (how far the worker has got), read with
    the admin API so that nothing but the worker ever talks to the group."""

    def __init__(self, settings: Settings) -> None:
        self.admin = AdminClient(settings.kafka_common())
        self.group = offsets_group(settings.worker_id)
        topic = settings.topic_clickstream
        parts = self.admin.list_topics(topic, timeout=10).topics[topic].partitions
        self.tps = [TopicPartition(topic, p) for p in parts]

    def committed(self) -> int:
        request = [ConsumerGroupTopicPartitions(self.group, self.tps)]
        result = self.admin.list_consumer_group_offsets(request)[self.group].result(timeout=10)
        return sum(max(tp.offset, 0) for tp in result.topic_partitions)

    def close(self) -> None:
        pass


def decisions_on_topic(settings: Settings, campaign_id: str, idle_s: float = 2.0) -> int:
    """Distinct users with a ``campaign_id`` decision on the decisions topic, read afresh (a
    cross-check of :class:`_common.DecisionWatcher`)."""
    codec = Codec(settings.schema_registry_url)
    consumer = Consumer(
        {**settings.kafka_common(), "group.id": f"bench-count-{time.time_ns()}",
         "enable.auto.commit": False}
    )  # fmt: skip
    topic = settings.topic_decisions
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    users: set[str] = set()
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < idle_s:
            msgs = consumer.consume(1000, timeout=0.5)
            if msgs:
                quiet = time.monotonic()
            for msg in msgs:
                if msg.error() is None and msg.value():
                    name, record = codec.decode(msg.value())
                    if name == "TriggerDecision" and record["campaign_id"] == campaign_id:
                        users.add(record["user_id"])
    finally:
        consumer.close()
    return len(users)


def stored_state(settings: Settings, user: str, idle_s: float = 2.0) -> str:
    """The user's latest ``user_state`` changelog value, summarized (diagnostics)."""
    from processors.core.engine import UserState
    from streams.state.timers import unpack_state

    consumer = Consumer(
        {**settings.kafka_common(), "group.id": f"bench-state-{time.time_ns()}",
         "enable.auto.commit": False}
    )  # fmt: skip
    topic = f"{settings.worker_id}-user_state-changelog"
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    latest: bytes | None = None
    found = False
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < idle_s:
            msgs = consumer.consume(1000, timeout=0.5)
            if msgs:
                quiet = time.monotonic()
            for msg in msgs:
                if msg.error() is None and msg.key() == user.encode():
                    latest, found = msg.value(), True
    finally:
        consumer.close()
    if not found:
        return "no changelog record"
    if latest is None:
        return "deleted"
    stored = unpack_state(latest)
    st = UserState.from_bytes(stored.state)
    return (
        f"partition {stored.partition} wake_at {stored.wake_at} wm {st.wm} max_ts {st.max_ts} "
        f"tail {len(st.tail)} deadlines {st.committed.deadlines} now {now_ms()}"
    )


def run(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str]]:
    stack = EmbeddedStack()
    state_dir = tmp / "stack"
    info = stack.up(state_dir)
    worker: Worker | None = None
    dispatcher: Dispatcher | None = None
    watcher: DecisionWatcher | None = None
    thread: threading.Thread | None = None
    try:
        campaigns = write_campaigns(tmp / "campaigns.yaml", [absence_campaign(args.absence_s)])
        settings = bench_settings(
            state_dir, clock="live", campaigns_file=campaigns, allowed_lateness_s=LATENESS_S
        )
        create_topics(info.bootstrap_servers, settings)
        signups = [f"s{i:05d}" for i in range(int(args.rate * args.latency_s * 0.01) + 10)]
        import_contacts(
            write_contacts(tmp / "contacts.jsonl", signups), settings, echo_errors=False
        )
        watcher = DecisionWatcher(settings)
        gateway = FakeGateway(0.02)
        if args.dispatcher_fetch_wait_ms is not None:
            # What-if: the dispatcher's consumer with a shorter fetch wait (see the docs).
            conf = settings.consumer_conf(settings.dispatcher_group)
            conf["fetch.wait.max.ms"] = args.dispatcher_fetch_wait_ms
            settings.__class__.consumer_conf = lambda _self, _group: dict(conf)  # type: ignore[method-assign,assignment]
        dispatcher = Dispatcher(settings, load_campaigns(campaigns), gateway, rate_per_s=30.0)
        thread = threading.Thread(target=dispatcher.run, daemon=True)
        thread.start()
        env = {
            "NUDGEFLOW_ALLOWED_LATENESS_S": str(LATENESS_S),
            "NUDGEFLOW_STATE_TTL_S": str(TTL_MS / 1000),
        }
        worker = Worker(settings, tmp, env=env)
        events = Events(settings)
        events.send("warm-up", "points_earned", {"tier": "gold", "points": "1"})
        events.flush()
        wait_for("the worker's first decision", lambda: watcher.snapshot(), 90, worker)
        say(f"worker live (pid {worker.pid}); phase 1: {args.rate:.0f} events/s")

        # ---- phase 1: latency
        rng = random.Random(7)
        returning = [f"r{i:05d}" for i in range(50_000)]
        signup_iter = iter(signups)
        texted: list[str] = []
        t1 = now_ms()

        def emit(i: int) -> None:
            if i % 100 == 0:
                user = next(signup_iter)
                texted.append(user)
                events.send(user, "event_signup", {"event_name": "bench night"})
            elif i % 100 < 5:
                events.send(f"l{i:07d}", "points_earned", {"tier": "gold", "points": "50"})
            else:
                events.send(rng.choice(returning), "page_view", {"page": "/"})

        paced(args.rate, args.latency_s, emit)
        events.flush()
        t1_end = now_ms()
        progress = Progress(settings)
        wait_for("the worker to catch up", lambda: progress.committed() >= events.n, 180, worker)
        caught_up_s = (now_ms() - t1_end) / 1000
        wait_for("the phase-1 texts", lambda: len(gateway.arrivals) >= len(texted), 60, worker)
        decided = {
            r["decision_id"]: (r, created)
            for r, created in watcher.snapshot()
            if r["campaign_id"] in IMMEDIATE and t1 <= r["trigger_ts"] <= t1_end
        }
        decision_ms = [created - r["trigger_ts"] for r, created in decided.values()]
        send_ms = [
            1000 * wall - decided[did][0]["trigger_ts"]
            for did, wall in gateway.arrivals
            if did in decided
        ]
        say(
            f"phase 1: {len(decision_ms)} immediate decisions, p50 "
            f"{percentile(decision_ms, 50):.0f} ms p99 {percentile(decision_ms, 99):.0f} ms; "
            f"{len(send_ms)} texts, p99 {percentile(send_ms, 99):.0f} ms; worker caught up "
            f"{caught_up_s:.1f} s after the last event"
        )

        # Phases 2 and 3 measure the worker alone: the dispatcher would only compete with it for
        # the CPU (100k suppressions of contact-less timer decisions).
        dispatcher.stop()
        thread.join(30)

        # ---- phase 2: timers
        opening_s = args.episodes / args.episode_rate
        if opening_s >= args.absence_s:
            raise BenchError(
                f"--episodes / --episode-rate must open them within --absence-s {args.absence_s:g}"
            )
        say(
            f"phase 2: {args.episodes} absence episodes of {args.absence_s:g} s opened over "
            f"{opening_s:.0f} s (all open when the first fires)"
        )
        produced_at = time.monotonic()
        events.flush()
        paced(args.episode_rate, opening_s, lambda i: events.send(f"b{i:06d}", "bench_start"))
        events.flush()

        def fired() -> list[tuple[dict[str, Any], int]]:
            return [(r, c) for r, c in watcher.snapshot() if r["campaign_id"] == "bench-absence"]

        # Every timer is due --absence-s after its episode opened; give them --timer-grace s
        # more, then count the ones that did not fire as missing rather than failing the run.
        give_up = time.monotonic() + args.absence_s + LATENESS_S + args.timer_grace
        while len(fired()) < args.episodes and time.monotonic() < give_up:
            worker.check_alive()
            time.sleep(0.2)
        done = fired()  # one snapshot: timers keep firing while this is reported
        missing = args.episodes - len(done)
        if missing:
            on_topic = decisions_on_topic(settings, "bench-absence")
            seen = {r["user_id"] for r, _c in done}
            absent = [f"b{i:06d}" for i in range(args.episodes) if f"b{i:06d}" not in seen]
            say(
                f"phase 2: {missing} of {args.episodes} timers had not fired "
                f"{args.timer_grace:.0f} s after due "
                f"({on_topic} bench-absence decisions on the topic; e.g. {absent[:3]}; "
                f"{absent[0]}: {stored_state(settings, absent[0])})"
            )
        lateness_s = [(c - (r["fire_at"] + LATENESS_S * 1000)) / 1000 for r, c in done]
        ingest_s = time.monotonic() - produced_at
        wait_for("the worker to catch up", lambda: progress.committed() >= events.n, 60, worker)
        say(
            f"phase 2: {len(lateness_s)} timers fired within {ingest_s:.0f} s; lateness p50 "
            f"{percentile(lateness_s, 50):.2f} s p99 {percentile(lateness_s, 99):.2f} s max "
            f"{max(lateness_s, default=float('nan')):.2f} s"
        )

        # ---- phase 3: soak
        events.flush()
        say(f"phase 3: {args.soak_rate:.0f} new users/s for {args.soak_s:.0f} s (TTL 10 s)")
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        last_sample = [0.0]

        def emit_new(i: int) -> None:
            events.send(f"n{i:07d}", "page_view", {"page": "/new"})
            t = time.monotonic() - start
            if t - last_sample[0] >= 2.0:
                last_sample[0] = t
                samples.append((t, rss_bytes(worker.pid)))

        paced(args.soak_rate, args.soak_s, emit_new)
        events.flush()
        samples.append((time.monotonic() - start, rss_bytes(worker.pid)))
        soak_lag = events.n - progress.committed()
        progress.close()
        settled = [rss for t, rss in samples if t >= args.soak_s / 3]
        base, end = settled[0], settled[-1]
        growth = end / base - 1 if base else float("nan")
        say(
            "phase 3: RSS MB "
            + " ".join(
                f"{t:.0f}s:{rss / 2**20:.0f}" for t, rss in samples[:: max(1, len(samples) // 12)]
            )
        )
        return [
            ("latency_rate_per_s", f"{args.rate:.0f}"),
            ("decisions_measured", str(len(decision_ms))),
            ("decision_p50_ms", f"{percentile(decision_ms, 50):.0f}"),
            ("decision_p99_ms", f"{percentile(decision_ms, 99):.0f}"),
            ("sends_measured", str(len(send_ms))),
            ("send_p50_ms", f"{percentile(send_ms, 50):.0f}"),
            ("send_p99_ms", f"{percentile(send_ms, 99):.0f}"),
            ("timer_episodes", str(args.episodes)),
            ("timer_missing", str(missing)),
            ("timer_lateness_p50_s", f"{percentile(lateness_s, 50):.2f}"),
            ("timer_lateness_p99_s", f"{percentile(lateness_s, 99):.2f}"),
            ("soak_users", str(int(args.soak_rate * args.soak_s))),
            ("rss_start_mb", f"{base / 2**20:.0f}"),
            ("rss_end_mb", f"{end / 2**20:.0f}"),
            ("soak_lag_events", str(max(0, soak_lag))),
            ("rss_growth", f"{growth:+.3f}"),
        ]
    finally:
        if worker is not None:
            worker.stop()
        if dispatcher is not None:
            dispatcher.stop()
        if thread is not None:
            thread.join(30)
        if watcher is not None:
            watcher.stop()
        stack.down(state_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=1000.0, help="phase 1 events/s (1000)")
    parser.add_argument("--latency-s", type=float, default=10.0, help="phase 1 seconds (10)")
    parser.add_argument("--episodes", type=int, default=100_000, help="open timers (100000)")
    parser.add_argument(
        "--episode-rate", type=float, default=2000.0, help="episodes opened per s (2000)"
    )
    parser.add_argument(
        "--absence-s", type=float, default=60.0, help="the episodes' absence window, s (60)"
    )
    parser.add_argument(
        "--timer-grace", type=float, default=20.0, help="s to wait past the last deadline (20)"
    )
    parser.add_argument(
        "--dispatcher-fetch-wait-ms",
        type=int,
        default=None,
        help="what-if: fetch.wait.max.ms of the dispatcher's consumer (default: its own)",
    )
    parser.add_argument("--soak-rate", type=float, default=5000.0, help="new users/s (5000)")
    parser.add_argument("--soak-s", type=float, default=200.0, help="soak seconds (200)")
    return run_main("live", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
