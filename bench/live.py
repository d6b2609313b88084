"""Live-clock figures of the trigger worker: decision and send latency, timer lateness, memory.

One embedded stack, one worker (live clock, every example campaign plus phase 2's absence
campaigns, changelog on, allowed lateness 2 s, state TTL 10 s via ``NUDGEFLOW_STATE_TTL_S``) and
one in-process dispatcher whose gateway answers after 20 ms (``_common.FakeGateway``). Phases,
each waiting for the worker to catch up (committed offsets) before the next:

0. **Drain rate** (``--max-events``, default 60,000): a backlog of phase 1's mix produced at
   once; the worker's rate while it drains it, from its own ``nudgeflow_events_consumed_total``
   (as ``trigger_throughput.py``). At 7,000-12,000 events/s the drain ends before the 10 s
   TTL (+2 s lateness): the expiry of the users it created comes after it, not in its rate
   (it is in phases 0b and 1, as at a steady load).
   **0b. Maximum rate**: phase 1's mix produced live at ``--overload`` (150%) of the drain rate
   for ``--overload-s`` (6 s) while the dispatcher runs, as in phase 1, and by the same path
   (each event encoded and stamped as it is produced: the benchmark's own CPU beside the worker
   is phase 1's); the worker's rate from the same counter while the producer runs
   (``max_rate_live_per_s``).
1. **Latency** (``--load`` x phase 0b's rate, default 80%, for ``--latency-s`` 10 s;
   ``--max-from backlog``: x phase 0's; ``--rate`` gives a fixed rate instead); also the
   worker's own rate and share of a core while the producer runs. Page views of returning
   users, ``points_earned`` (gold, 4%) and ``event_signup`` (1%) of users without contacts
   (decided, then suppressed by the dispatcher), and ``event_signup`` of opted-in users at
   10/s (decided and texted, under the 30/s gateway limit). ``decision_p99_ms``: the
   decision's Kafka CreateTime minus the event time (events are stamped when produced).
   ``send_p99_ms``: the fake gateway's arrival time minus the event time, for the texted
   signups.
2. **Timers** (about 1,000,000 open episodes): ``--timer-users`` distinct users (100,000) at
   ``--episode-rate`` (2,000/s) each open an episode in each of ``--held-campaigns`` (10)
   absence campaigns held for an hour, and 1 in ``--measured-every`` (2) of them also one in
   the measured campaign, whose window is longer than the opening (``--absence-s``, default the
   opening time + 5 s): all are open when the first fires, and the 50,000 measured ones come
   due at the rate they were opened (1,000/s) while 1,050,000 down to 1,000,000 are open. The
   worker's own ``nudgeflow_open_episodes`` is read before the first is due
   (``timer_open_episodes``). ``timer_lateness_p99_s``: the decision's CreateTime minus
   (deadline + allowed lateness).
3. **Soak** (``--soak-rate`` new users/s for ``--soak-s``, default 5,000/s for 200 s = 1,000,000
   users): one page view per new user; with the 10 s TTL the number of live users levels off
   (phase 2's held episodes stay, unchanged, throughout). ``rss_growth``: the worker's RSS at
   the end over its RSS a third into the soak; ``soak_lag_events``: soak events the worker had
   not checkpointed when the soak ended.

After phases 1-3 the worker's GC passes by generation and its ticks' delay over the phase are
printed ("stalls", from its ``nudgeflow_gc_pause_seconds`` and ``nudgeflow_tick_delay_seconds``).
Every phase produces with librdkafka's default 5 ms linger (the event time is stamped before
it, so the latency figures include that wait).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

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
from trigger_throughput import (
    BenchError,
    Sample,
    Worker,
    consumed_window,
    events_consumed,
    free_port,
    process_cpu_s,
    run_main,
    say,
)

from processors.commands.contacts import import_contacts
from processors.core.campaign import load_campaigns
from processors.core.events import ClickEvent
from processors.devstack import EmbeddedStack, create_topics
from processors.dispatcher import Dispatcher
from processors.settings import Settings
from schemas.codec import Codec
from streams.reader import BATCH_MAX, offsets_group

LATENESS_S = 2.0
TTL_MS = 10_000
SETTLE_TIMEOUT_S = 120.0
PHASE0_SETTLE_S = 3.0
ABSENCE_MARGIN_S = 5.0  # phase 2's window past its opening time (default --absence-s)


MEASURED = "bench-absence"
HELD_S = 3600.0  # the held episodes' window: none is due before the benchmark ends


def absence_campaign(
    after_s: float, campaign_id: str = MEASURED, start: tuple[str, ...] = ("bench_start",)
) -> dict[str, Any]:
    """The timers phase's campaigns: a ``start`` event opens an episode that fires after_s
    later."""
    return {
        "id": campaign_id,
        "trigger": {"type": "absence", "start": list(start), "cancel": ["bench_stop"],
                    "after": f"{after_s:g}s"},
        "message": {"template": "Come back!"},
    }  # fmt: skip


IMMEDIATE = ("signup-confirm", "loyalty-gold")
LINGER_MS = 5
TEXTS_PER_S = 10  # phase 1's texted signups: well under the dispatcher's 30/s gateway limit
RETURNING = 50_000


def mix(i: int, rng: random.Random, prefix: str) -> tuple[str, str, dict[str, str]]:
    """Event ``i`` of phases 0-1 (user, type, properties): 1% signups and 4% gold points of
    users without contacts (decided at once, then suppressed by the dispatcher), 95% page views
    of a pool of returning users."""
    if i % 100 == 0:
        return f"{prefix}s{i:07d}", "event_signup", {"event_name": "bench night"}
    if i % 100 < 5:
        return f"{prefix}l{i:07d}", "points_earned", {"tier": "gold", "points": "50"}
    return f"r{rng.randrange(RETURNING):05d}", "page_view", {"page": "/"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Events:
    """Encodes and produces clickstream events stamped with the current time."""

    def __init__(self, settings: Settings, linger_ms: int = LINGER_MS) -> None:
        self.topic = settings.topic_clickstream
        self.codec = Codec(settings.schema_registry_url)
        self.producer = Producer({**settings.kafka_common(), "linger.ms": linger_ms})
        self.n = 0

    def encode(self, user: str, event_type: str, props: dict[str, str] | None = None) -> bytes:
        self.n += 1
        ev = ClickEvent(f"b-{self.n}", user, event_type, now_ms(), f"{user}-s", props or {})
        return self.codec.encode("ClickEvent", ev.to_record())

    def send(self, user: str, event_type: str, props: dict[str, str] | None = None) -> None:
        self.produce(user, self.encode(user, event_type, props))

    def produce(self, user: str, value: bytes) -> None:
        """Produce an event :meth:`encode` made (counted in ``n`` then)."""
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


def max_rate_on_mix(
    port: int, events: Events, worker: Worker, rng: random.Random, n: int
) -> tuple[float, float]:
    """Phase 0: a backlog of ``n`` events of phase 1's mix, produced at once; the worker's rate
    (and per CPU-second) while it drains it, from its own ``nudgeflow_events_consumed_total``
    sampled every 0.25 s (its first batch left out, as in ``trigger_throughput.py``)."""
    base = events_consumed(port)
    if base is None:
        raise BenchError("the worker's /metrics did not answer")
    values = [(user, events.encode(user, kind, props)) for user, kind, props in
              (mix(i, rng, "m") for i in range(n))]  # fmt: skip
    for user, value in values:
        events.produce(user, value)
    events.flush()
    samples: list[Sample] = []
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        consumed = events_consumed(port)
        t = time.monotonic()
        if consumed is not None:
            samples.append(Sample(t, 0, process_cpu_s(worker.pid), consumed - base))
            if consumed - base >= n:
                break
        worker.check_alive()
        if t > deadline:
            raise BenchError(f"the worker did not drain phase 0's {n} events")
        time.sleep(0.25)
    window = consumed_window(samples, n)
    if window is None:
        raise BenchError("phase 0 was drained too fast to measure; use more --max-events")
    first, last = window
    done = float(cast(int, last.consumed) - cast(int, first.consumed))
    cpu = last.cpu - first.cpu
    return done / (last.t - first.t), (done / cpu if cpu > 0 else math.nan)


def max_rate_overloaded(
    port: int, events: Events, worker: Worker, rng: random.Random, rate: float, seconds: float
) -> tuple[float, float, bool]:
    """Phase 0b: phase 1's mix produced live at ``rate`` (above what the worker drains) for
    ``seconds`` while the dispatcher runs, as in phase 1; the worker's rate (and per CPU-second)
    from its own ``nudgeflow_events_consumed_total`` sampled every 0.25 s while the producer
    runs (its first batch left out). Also whether it had a backlog to the end (if not, the rate
    is only a lower bound of its maximum)."""
    base = events_consumed(port)
    if base is None:
        raise BenchError("the worker's /metrics did not answer")
    samples: list[Sample] = []  # ``committed``: events produced so far
    last = [0.0]

    def emit(i: int) -> None:
        events.send(*mix(i, rng, "o"))  # encoded and stamped when produced, as in phase 1
        t = time.monotonic()
        if t - last[0] >= 0.25:
            last[0] = t
            consumed = events_consumed(port)
            if consumed is not None:
                samples.append(Sample(t, i + 1, process_cpu_s(worker.pid), consumed - base))

    paced(rate, seconds, emit)
    busy = [s for s in samples if s.consumed]
    if len(busy) < 2 or busy[-1].t - busy[0].t < 1.0:
        raise BenchError("phase 0b was too short to measure; use more --overload-s")
    first, final = busy[0], busy[-1]
    done = float(cast(int, final.consumed) - cast(int, first.consumed))
    cpu = final.cpu - first.cpu
    backlog = final.committed - cast(int, final.consumed) > BATCH_MAX
    return done / (final.t - first.t), (done / cpu if cpu > 0 else math.nan), backlog


def open_episodes_on(port: int, prefix: str) -> int:
    """The worker's ``nudgeflow_open_episodes``, summed over the campaigns named ``prefix*``
    (-1 when its ``/metrics`` does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as answer:
            text = answer.read().decode()
    except (OSError, ValueError):
        return -1
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f'nudgeflow_open_episodes{{campaign="{prefix}'):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def scrape(port: int) -> dict[str, float]:
    """The worker's ``/metrics`` samples (``name{labels}`` -> value; empty if it does not
    answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as answer:
            text = answer.read().decode()
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nudgeflow_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def stalls(before: dict[str, float], after: dict[str, float]) -> str:
    """What stopped the worker between two :func:`scrape` s: its GC passes by generation
    (count, total and the longest bucket reached) and its ticks' delay (p99 bucket)."""

    def grown(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    parts = []
    for gen in "012":
        n = grown(f'nudgeflow_gc_pause_seconds_count{{generation="{gen}"}}')
        total = grown(f'nudgeflow_gc_pause_seconds_sum{{generation="{gen}"}}')
        buckets = sorted(
            (float(k.split('le="')[1].rstrip('"}')), grown(k))
            for k in after
            if k.startswith(f'nudgeflow_gc_pause_seconds_bucket{{generation="{gen}"')
            and "+Inf" not in k
        )
        longest = next((le for le, c in buckets if c >= n), math.inf) if n else 0.0
        parts.append(f"gen{gen} {n:.0f} passes {total:.2f} s (longest <= {longest:g} s)")
    ticks = grown("nudgeflow_tick_delay_seconds_count")
    tick_buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), grown(k))
        for k in after
        if k.startswith("nudgeflow_tick_delay_seconds_bucket") and "+Inf" not in k
    )
    p50, p99 = (
        next((le for le, c in tick_buckets if c >= q * ticks), math.inf) if ticks else 0.0
        for q in (0.5, 0.99)
    )
    parts.append(f"{ticks:.0f} ticks applied, delay p50 <= {p50:g} s p99 <= {p99:g} s")
    return "; ".join(parts)


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
        timer_users, every = args.timer_users, args.measured_every
        measured_users = len(range(0, timer_users, every))
        episodes = timer_users * args.held_campaigns + measured_users
        opening_s = timer_users / args.episode_rate
        absence_s = args.absence_s if args.absence_s is not None else opening_s + ABSENCE_MARGIN_S
        if opening_s >= absence_s:
            raise BenchError(f"phase 2 opens its episodes over {opening_s:g} s: --absence-s must "
                             f"be longer (all open when the first fires)")  # fmt: skip
        held = [
            absence_campaign(HELD_S, f"{MEASURED}-held-{j}", ("bench_start", "bench_hold"))
            for j in range(1, args.held_campaigns + 1)
        ]
        campaigns = write_campaigns(tmp / "campaigns.yaml", [absence_campaign(absence_s), *held])
        settings = bench_settings(
            state_dir, clock="live", campaigns_file=campaigns, allowed_lateness_s=LATENESS_S
        )
        create_topics(info.bootstrap_servers, settings)
        texted_max = int(TEXTS_PER_S * args.latency_s) + 10
        signups = [f"s{i:05d}" for i in range(texted_max)]
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
        metrics_port = free_port()
        env = {
            "NUDGEFLOW_ALLOWED_LATENESS_S": str(LATENESS_S),
            "NUDGEFLOW_STATE_TTL_S": str(TTL_MS / 1000),
            "NUDGEFLOW_METRICS_PORT": str(metrics_port),
        }
        worker = Worker(settings, tmp, env=env)
        events = Events(settings)
        events.send("warm-up", "points_earned", {"tier": "gold", "points": "1"})
        events.flush()
        wait_for("the worker's first decision", lambda: watcher.snapshot(), 90, worker)
        say(f"worker ready (pid {worker.pid})")
        progress = Progress(settings)
        rng = random.Random(7)

        # ---- phase 0: the worker's maximum rate on phase 1's mix
        max_rate = live_max = math.nan
        if args.rate is None:
            max_rate, cpu_rate = max_rate_on_mix(metrics_port, events, worker, rng, args.max_events)
            say(
                f"phase 0: the worker drained {args.max_events} events at {max_rate:,.0f} "
                f"events/s ({cpu_rate:,.0f} per CPU-second, {max_rate / cpu_rate:.2f} of a core)"
            )
            wait_for("the worker to catch up", lambda: progress.committed() >= events.n, 60, worker)
            time.sleep(PHASE0_SETTLE_S)  # the dispatcher's share of phase 0, expiries
            live_max, live_cpu, backlog = max_rate_overloaded(
                metrics_port, events, worker, rng, args.overload * max_rate, args.overload_s
            )
            say(
                f"phase 0b: produced live at {args.overload:.0%} of that for "
                f"{args.overload_s:g} s, the worker consumed {live_max:,.0f} events/s "
                f"({live_cpu:,.0f} per CPU-second, {live_max / live_cpu:.2f} of a core)"
                + ("" if backlog else "; it kept up: a lower bound")
            )
            events.flush()
            wait_for(
                "the worker to catch up", lambda: progress.committed() >= events.n, 120, worker
            )
            time.sleep(PHASE0_SETTLE_S)
            base_rate = max_rate if args.max_from == "backlog" else live_max
            rate = args.load * base_rate
            say(f"phase 1 at {args.load:.0%} of phase 0{'b' * (args.max_from == 'live')}'s: "
                f"{rate:,.0f} events/s")  # fmt: skip
        else:
            rate = args.rate
            say(f"worker live (pid {worker.pid}); phase 1: {rate:.0f} events/s (given)")

        # ---- phase 1: latency
        signup_iter = iter(signups)
        texted: list[str] = []
        text_every = max(100, int(rate / TEXTS_PER_S))  # texts stay under the gateway limit
        t1 = now_ms()
        scraped = scrape(metrics_port)
        p1_start = (time.monotonic(), process_cpu_s(worker.pid), events_consumed(metrics_port))

        def emit(i: int) -> None:
            if i % text_every == 0:
                user = next(signup_iter)
                texted.append(user)
                events.send(user, "event_signup", {"event_name": "bench night"})
            else:
                events.send(*mix(i, rng, "p"))

        paced(rate, args.latency_s, emit)
        events.flush()
        t1_end = now_ms()
        p1_end = (time.monotonic(), process_cpu_s(worker.pid), events_consumed(metrics_port))
        p1_s, p1_cpu = p1_end[0] - p1_start[0], p1_end[1] - p1_start[1]
        p1_done = (p1_end[2] or 0) - (p1_start[2] or 0)
        say(
            f"phase 1: while producing, the worker consumed {p1_done / p1_s:,.0f} events/s on "
            f"{p1_cpu / p1_s:.2f} of a core ({p1_done / p1_cpu if p1_cpu > 0 else math.nan:,.0f} "
            f"per CPU-second)"
        )
        wait_for("the worker to catch up", lambda: progress.committed() >= events.n, 180, worker)
        caught_up_s = (now_ms() - t1_end) / 1000
        say(f"phase 1 stalls: {stalls(scraped, scrape(metrics_port))}")
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
        by_second: dict[int, list[float]] = {}
        for r, created in decided.values():
            by_second.setdefault((r["trigger_ts"] - t1) // 1000, []).append(
                created - r["trigger_ts"]
            )
        say(
            "phase 1: p99 ms by second "
            + " ".join(f"{percentile(v, 99):.0f}" for _k, v in sorted(by_second.items()))
        )
        say(
            f"phase 1: {len(decision_ms)} immediate decisions, p50 "
            f"{percentile(decision_ms, 50):.0f} ms p99 {percentile(decision_ms, 99):.0f} ms; "
            f"{len(send_ms)} texts, p99 {percentile(send_ms, 99):.0f} ms; worker caught up "
            f"{caught_up_s:.1f} s after the last event"
        )

        latency = [
            ("max_rate_per_s", f"{max_rate:.0f}"),
            ("max_rate_live_per_s", f"{live_max:.0f}"),
            ("latency_rate_per_s", f"{rate:.0f}"),
            ("decisions_measured", str(len(decision_ms))),
            ("decision_p50_ms", f"{percentile(decision_ms, 50):.0f}"),
            ("decision_p99_ms", f"{percentile(decision_ms, 99):.0f}"),
            ("sends_measured", str(len(send_ms))),
            ("send_p50_ms", f"{percentile(send_ms, 50):.0f}"),
            ("send_p99_ms", f"{percentile(send_ms, 99):.0f}"),
        ]
        if args.until == 1:
            return latency

        # Phases 2 and 3 measure the worker alone: the dispatcher would only compete with it for
        # the CPU (100k suppressions of contact-less timer decisions).
        dispatcher.stop()
        thread.join(30)

        # ---- phase 2: timers
        say(
            f"phase 2: {episodes} absence episodes ({timer_users} users x {args.held_campaigns} "
            f"held campaigns + 1 in {every} of them in the measured one) opened over "
            f"{opening_s:.0f} s; {measured_users} due {absence_s:g} s after "
            f"opening, the rest held"
        )
        produced_at = time.monotonic()
        scraped = scrape(metrics_port)
        events.flush()
        paced(
            args.episode_rate,
            opening_s,
            lambda i: events.send(f"b{i:07d}", "bench_hold" if i % every else "bench_start"),
        )
        events.flush()
        first_due = produced_at + absence_s
        while progress.committed() < events.n and time.monotonic() < first_due:
            worker.check_alive()  # caught up before the first is due (else: counted so far)
            time.sleep(0.2)
        open_episodes = open_episodes_on(metrics_port, MEASURED)
        say(f"phase 2: the worker counts {open_episodes} open episodes before the first is due")

        def fired() -> list[tuple[dict[str, Any], int]]:
            return [(r, c) for r, c in watcher.snapshot() if r["campaign_id"] == MEASURED]

        # Every timer is due absence_s after its episode opened; give them --timer-grace s
        # more, then count the ones that did not fire as missing rather than failing the run.
        give_up = produced_at + absence_s + opening_s + LATENESS_S + args.timer_grace
        while len(fired()) < measured_users and time.monotonic() < give_up:
            worker.check_alive()
            time.sleep(0.2)
        done = fired()  # one snapshot: timers keep firing while this is reported
        missing = measured_users - len(done)
        if missing:
            on_topic = decisions_on_topic(settings, MEASURED)
            seen = {r["user_id"] for r, _c in done}
            absent = [f"b{i:07d}" for i in range(0, timer_users, every) if f"b{i:07d}" not in seen]
            say(
                f"phase 2: {missing} of {measured_users} timers had not fired "
                f"{args.timer_grace:.0f} s after due "
                f"({on_topic} {MEASURED} decisions on the topic; e.g. {absent[:3]}; "
                f"{absent[0]}: {stored_state(settings, absent[0])})"
            )
        lateness_s = [(c - (r["fire_at"] + LATENESS_S * 1000)) / 1000 for r, c in done]
        ingest_s = time.monotonic() - produced_at
        say(f"phase 2 stalls: {stalls(scraped, scrape(metrics_port))}")
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
        scraped = scrape(metrics_port)
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
        say(f"phase 3 stalls: {stalls(scraped, scrape(metrics_port))}")
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
            *latency,
            ("timer_episodes", str(episodes)),
            ("timer_open_episodes", str(open_episodes)),
            ("timer_fired", str(len(lateness_s))),
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
    parser.add_argument(
        "--rate", type=float, default=None, help="phase 1 events/s (default: --load x phase 0's)"
    )
    parser.add_argument(
        "--load", type=float, default=0.8, help="phase 1's share of the measured maximum (0.8)"
    )
    parser.add_argument(
        "--max-events", type=int, default=60_000, help="phase 0's backlog, events (60000)"
    )
    parser.add_argument(
        "--overload",
        type=float,
        default=1.5,
        help="phase 0b's live rate as a share of phase 0's drain rate (1.5)",
    )
    parser.add_argument("--overload-s", type=float, default=6.0, help="phase 0b seconds (6)")
    parser.add_argument(
        "--max-from",
        choices=("live", "backlog"),
        default="live",
        help="the maximum phase 1's --load applies to: phase 0b's (live) or phase 0's (backlog)",
    )
    parser.add_argument("--latency-s", type=float, default=10.0, help="phase 1 seconds (10)")
    parser.add_argument(
        "--until",
        type=int,
        choices=(1, 3),
        default=3,
        help="the last phase to run: 1 (the maximum rate and latency only) or 3 (all)",
    )
    parser.add_argument(
        "--timer-users", type=int, default=100_000, help="users opening episodes (100000)"
    )
    parser.add_argument(
        "--held-campaigns",
        type=int,
        default=10,
        help="absence campaigns held for an hour, opened by every such user (10)",
    )
    parser.add_argument(
        "--measured-every",
        type=int,
        default=2,
        help="every n-th such user also opens the measured episode (2)",
    )
    parser.add_argument(
        "--episode-rate", type=float, default=2000.0, help="users opening episodes per s (2000)"
    )
    parser.add_argument(
        "--absence-s",
        type=float,
        default=None,
        help=f"the measured episodes' window, s (default: the opening time + {ABSENCE_MARGIN_S:g})",
    )
    parser.add_argument(
        "--timer-grace", type=float, default=10.0, help="s to wait past the last deadline (10)"
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
