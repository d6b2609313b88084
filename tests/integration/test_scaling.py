"""Scaling on the embedded stack: three Faust workers and two dispatchers, each a separate
``nudgeflow worker`` / ``nudgeflow dispatcher`` process with its own ``/metrics``, on a clickstream
topic with 8 partitions. One worker leaves mid-stream and a fresh one joins; the decisions still
equal ``nudgeflow backtest`` on the same input, no decision reaches the gateway twice, every
decision has exactly one final outcome, and the processes' counters agree with the topics.

The run: the groups form; the first half of the input is produced; one worker leaves while the
third quarter flows (its partitions, with their open episodes, move to the two survivors through
the changelog); a fresh worker joins while the last quarter flows (partitions move again); end
of input is marked and the test waits for the dispatchers' end-of-input markers on every
outcomes partition.

Why the counter sums are exact although a process is stopped: counters live in process memory,
so a stopped worker's counts die with it. The worker is therefore stopped at a quiet point: the
first half has been processed *and committed* by the whole group (committed offsets = log end
offsets on every partition), every process has been scraped, and only then does the worker get
SIGTERM. With the event clock only input moves time (no ticks), so between that scrape and its
exit the worker sends nothing: the scrape is its final count. It still owns open episodes then
(asserted), whose state and timers must move. Hence:

* workers: the stopped worker's last scrape plus the live workers' final scrapes of
  ``nudgeflow_decisions_total`` / ``nudgeflow_decisions_cancelled_total`` equal the
  ``TriggerDecision`` / ``DecisionCancelled`` records on ``sms-decisions``, redeliveries included
  (every record was counted by the process that sent it); ``nudgeflow_events_consumed_total`` is
  at least the input (a record redelivered after a rebalance is consumed and counted again);
* dispatchers are never stopped, so their final counters equal the ``SmsOutcome`` records by
  status, campaign, variant and reason, and the deferred gauges add up to 0; each dispatcher
  writes its own outbox file, so "sent twice" would show up as a decision id in two lines of the
  two files together.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from processors import metrics
from processors.commands.backtest import run_backtest
from processors.commands.contacts import import_contacts
from processors.commands.produce import send_flush
from processors.core.campaign import load_campaigns
from processors.core.decision import Decision
from processors.core.events import ClickEvent
from processors.core.outcome import SmsOutcome
from processors.demo.run import EXAMPLES
from processors.devstack import StackInfo
from processors.kafka.control import FlushTracker, is_control
from processors.settings import Settings
from processors.simulate import generate
from schemas.codec import Codec
from streams.reader import offsets_group
from tests.conftest import isolated_settings
from tests.integration.test_metrics import Samples, free_port, scrape
from tests.integration.test_streams_smoke import NUDGEFLOW, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.long]

PARTITIONS = 8
USERS, EVENTS, SEED = 1_000, 12_000, 7
CAMPAIGNS = EXAMPLES / "campaigns.yaml"
# Quiet hours are 20:00-09:00 local: with these zones some texts are deferred, some sent at once.
ZONES = ("UTC", "America/New_York", "Europe/London", "Asia/Kolkata")

ENGINE_METRICS = (
    "nudgeflow_events_consumed_total",
    "nudgeflow_events_dead_lettered_total",
    "nudgeflow_decisions_total",
    "nudgeflow_decisions_cancelled_total",
    "nudgeflow_open_episodes",
    "nudgeflow_event_to_decision_seconds",
    "nudgeflow_timer_lateness_seconds",
    "nudgeflow_consumer_lag",
)
DISPATCHER_METRICS = (
    "nudgeflow_sms_sent_total",
    "nudgeflow_sms_suppressed_total",
    "nudgeflow_sms_failed_total",
    "nudgeflow_sms_deferred",
    "nudgeflow_sms_segments_total",
    "nudgeflow_gateway_request_seconds",
    "nudgeflow_gateway_throttled_total",
    "nudgeflow_event_to_send_seconds",
)
WEBHOOK_METRICS = (
    "nudgeflow_delivery_receipts_total",
    "nudgeflow_opt_outs_total",
    "nudgeflow_link_clicks_total",
    "nudgeflow_conversions_total",
    "nudgeflow_webhook_signature_failures_total",
)
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_USER_OR_PHONE = re.compile(r"^(u\d{6}|\+?\d{8,})$")


# --------------------------------------------------------------------------- processes


class Proc:
    """One ``nudgeflow`` child process with its log file and metrics port."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, port: int):
        self.name, self.log, self.port = name, log, port
        self._out = log.open("ab")
        self._terminated = False
        self.popen = subprocess.Popen(argv, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def assert_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def scrape(self) -> tuple[str, Samples]:
        return scrape(self.port)

    def terminate(self) -> None:
        """One SIGTERM (a second one, during the clean shutdown, would kill the process)."""
        if not self._terminated and self.popen.poll() is None:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, then the exit code (-9 if it had to be killed)."""
        self.terminate()
        try:
            code = self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            code = -9
        self._out.close()
        return code


def scaling_settings(stack: StackInfo, tmp_path: Path) -> Settings:
    """Dev settings on the session stack with fresh 8-partition topics and fresh groups."""
    return isolated_settings(
        stack,
        partitions=PARTITIONS,
        clock="event",
        gateway="outbox",
        campaigns_file=CAMPAIGNS,
        outbox_path=tmp_path / "unused-outbox.jsonl",
    )


def dispatcher_env(settings: Settings, **extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGEFLOW_")}
    fields = {n: getattr(settings, n) for n in Settings.model_fields} | extra
    env.update({f"NUDGEFLOW_{k.upper()}": str(v) for k, v in fields.items() if v is not None})
    return env


def contact_rows(users: Iterable[str]) -> list[dict[str, str]]:
    """Every 25th user has no contact, every 20th opted out, the rest opted in."""
    rows = []
    for i, user in enumerate(sorted(users)):
        if i % 25 == 24:
            continue
        rows.append(
            {
                "user_id": user,
                "phone": f"+1415555{1000 + i:04d}",
                "consent": "opted_out" if i % 20 == 19 else "opted_in",
                "timezone": ZONES[i % len(ZONES)],
                "first_name": f"Name{i}",
            }
        )
    return rows


def produce(settings: Settings, codec: Codec, events: list[ClickEvent]) -> dict[int, int]:
    """Send ``events``; returns the log end offset each partition reached (delivery reports)."""
    producer = Producer({**settings.kafka_common(), "linger.ms": 5})
    ends: dict[int, int] = {}
    failed: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for e in events:
        producer.produce(
            settings.topic_clickstream,
            key=e.user_id.encode(),
            value=codec.encode("ClickEvent", e.to_record()),
            on_delivery=delivered,
        )
        producer.poll(0)
    assert producer.flush(30) == 0 and not failed, failed
    return ends


# --------------------------------------------------------------------------- topics


class Tape:
    """Reads ``sms-decisions`` and ``sms-outcomes`` from the beginning, without a group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec(settings.schema_registry_url)
        self.consumer = Consumer(
            {**settings.kafka_common(), "group.id": f"t-scaling-{uuid.uuid4().hex}",
             "enable.auto.commit": False}
        )  # fmt: skip
        self.topics = (settings.topic_decisions, settings.topic_outcomes)
        self.consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in self.topics for p in range(PARTITIONS)]
        )
        self.decisions: list[Decision] = []
        self.cancels: list[dict[str, Any]] = []
        self.outcomes: list[SmsOutcome] = []
        self.decision_flushes = FlushTracker(partitions=set(range(PARTITIONS)))
        self.outcome_flushes = FlushTracker(partitions=set(range(PARTITIONS)))
        self.next_offset: dict[tuple[str, int], int] = {}

    def pump(self, timeout: float = 0.2) -> None:
        for m in self.consumer.consume(1000, timeout=timeout):
            if m.error():
                continue
            topic, partition = m.topic(), m.partition()
            self.next_offset[(topic, partition)] = m.offset() + 1
            if is_control(m.headers()):
                flushes = (
                    self.decision_flushes
                    if topic == self.settings.topic_decisions
                    else self.outcome_flushes
                )
                flushes.observe(partition, m.headers())
                continue
            name, rec = self.codec.decode(m.value())
            if name == "TriggerDecision":
                self.decisions.append(Decision.from_record(rec))
            elif name == "DecisionCancelled":
                self.cancels.append(rec)
            else:
                self.outcomes.append(SmsOutcome.from_record(rec))

    def at_end(self) -> bool:
        """Both topics read up to the broker's high watermarks."""
        for topic in self.topics:
            for p in range(PARTITIONS):
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=5, cached=False
                )
                if self.next_offset.get((topic, p), 0) < high:
                    return False
        return True

    def close(self) -> None:
        self.consumer.close()


def log_end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    c = Consumer({**settings.kafka_common(), "group.id": f"t-{uuid.uuid4().hex}"})
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)[1]
            for p in range(PARTITIONS)
        }
    finally:
        c.close()


# --------------------------------------------------------------------------- metrics


def declared(text: str) -> set[str]:
    """Metric names a text exposition declares (``# TYPE`` lines)."""
    return {name for name, _type in _TYPE_LINE.findall(text)}


def per_label(samples: Iterable[Samples], name: str, *labels: str) -> Counter[tuple[str, ...]]:
    """Sum of ``name`` over processes by the values of ``labels``; zero sums are left out."""
    total: Counter[tuple[str, ...]] = Counter()
    for s in samples:
        for (n, ls), v in s.items():
            if n == name and v:
                d = dict(ls)
                total[tuple(d[label] for label in labels)] += int(v)
    return Counter({k: n for k, n in total.items() if n})  # gauges of several processes


def lag_partitions(samples: Samples, topic: str) -> dict[int, float]:
    return {
        int(dict(ls)["partition"]): v
        for (n, ls), v in samples.items()
        if n == "nudgeflow_consumer_lag" and dict(ls)["topic"] == topic
    }


def check_exposition(proc: Proc, role: str, settings: Settings) -> Samples:
    """``curl /metrics``: every metric of the issue is declared; the role's own have samples;
    no label value is a user id or a phone number."""
    text, samples = proc.scrape()
    missing = set(ENGINE_METRICS + DISPATCHER_METRICS + WEBHOOK_METRICS) - declared(text)
    assert not missing, f"{proc.name} /metrics lacks {sorted(missing)}"
    names = {n for (n, _ls) in samples}
    own = (
        {"nudgeflow_events_consumed_total", "nudgeflow_open_episodes",
         "nudgeflow_event_to_decision_seconds_count", "nudgeflow_timer_lateness_seconds_count"}
        if role == "worker"
        else {"nudgeflow_sms_sent_total", "nudgeflow_sms_suppressed_total",
              "nudgeflow_gateway_request_seconds_count", "nudgeflow_event_to_send_seconds_count"}
    )  # fmt: skip
    assert own <= names, f"{proc.name}: no samples of {sorted(own - names)}"
    topic = settings.topic_clickstream if role == "worker" else settings.topic_decisions
    assert lag_partitions(samples, topic), f"{proc.name}: no consumer lag of {topic}"
    leaked = {v for (_n, ls) in samples for _k, v in ls if _USER_OR_PHONE.match(v)}
    assert not leaked, f"{proc.name}: user ids or phone numbers in labels: {sorted(leaked)[:5]}"
    return samples


# --------------------------------------------------------------------------- the test


def test_three_workers_two_dispatchers_rebalance_mid_stream(
    stack: StackInfo, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = scaling_settings(stack, tmp_path)
    codec = Codec(settings.schema_registry_url)
    events = list(generate(users=USERS, events=EVENTS, seed=SEED))
    half = len(events) // 2
    contacts = tmp_path / "contacts.jsonl"
    contacts.write_text(
        "".join(json.dumps(r) + "\n" for r in contact_rows({e.user_id for e in events}))
    )
    published, skipped = import_contacts(contacts, settings, echo_errors=False)
    assert skipped == 0 and published == USERS - USERS // 25
    times: dict[str, float] = {"contacts imported": time.monotonic() - started}
    key_prefix = f"nf-scaling-{uuid.uuid4().hex[:8]}:"

    procs: list[Proc] = []
    live: list[Proc] = []

    def start_worker() -> Proc:
        n = sum(1 for p in procs if p.name.startswith("worker"))
        port = free_port()
        env = worker_env(settings, metrics_port=port)
        env["FAUST_DATADIR"] = str(tmp_path / f"worker{n}-data")  # not the repo root
        argv = [str(NUDGEFLOW), "worker", "--campaigns", str(CAMPAIGNS), "--clock", "event"]
        p = Proc(f"worker{n}", argv, env, tmp_path / f"worker{n}.log", port)
        procs.append(p)
        live.append(p)
        return p

    def start_dispatcher(n: int) -> Proc:
        port = free_port()
        outbox = tmp_path / f"outbox{n}.jsonl"
        env = dispatcher_env(settings, metrics_port=port, outbox_path=outbox)
        # Shared Redis rate limit: 30/s (Vonage's) would make ~500 sends take 17 s.
        argv = [sys.executable, "-m", "processors.commands.cli", "dispatcher", "--rate", "5000",
                "--key-prefix", key_prefix]  # fmt: skip
        p = Proc(f"dispatcher{n}", argv, env, tmp_path / f"dispatcher{n}.log", port)
        procs.append(p)
        live.append(p)
        return p

    tape = Tape(settings)

    def wait_until(cond: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
            for p in live:
                p.assert_alive()
            tape.pump(0.2)

    def scrape_quietly(p: Proc) -> Samples:
        try:
            return p.scrape()[1]
        except OSError:
            return {}  # not serving yet

    try:
        workers = [start_worker() for _ in range(3)]
        dispatchers = [start_dispatcher(n) for n in range(2)]

        def balanced() -> bool:
            """Each worker reports the lag of its own clickstream partitions, together all."""
            views = [set(lag_partitions(scrape_quietly(w), settings.topic_clickstream))
                     for w in workers]  # fmt: skip
            union = set().union(*views)
            every = set(range(PARTITIONS))
            return all(views) and union == every and sum(map(len, views)) == PARTITIONS

        def joined(d: Proc) -> bool:
            return "assigned partitions [" in d.log.read_text(errors="replace")

        # The group forms before the input flows: the rebalances under test are the two below.
        wait_until(lambda: balanced() and all(map(joined, dispatchers)), "the groups", 45)
        times["groups formed"] = time.monotonic() - started

        # ---- first half, processed and committed by the whole group
        ends = produce(settings, codec, events[:half])
        group = Consumer({**settings.kafka_common(), "group.id": offsets_group(settings.worker_id)})
        tps = [TopicPartition(settings.topic_clickstream, p) for p in range(PARTITIONS)]

        def first_half_committed() -> bool:
            committed = {tp.partition: tp.offset for tp in group.committed(tps, timeout=5)}
            return all(committed[p] >= end for p, end in ends.items())

        wait_until(first_half_committed, "the first half to be committed", 60)
        times["first half committed"] = time.monotonic() - started
        group.close()
        assert balanced(), "a worker left the group during the first half"

        mid = {p.name: check_exposition(p, "worker", settings) for p in workers}
        for d in dispatchers:
            # The worker group's commit does not wait for the texts: a dispatcher sends its
            # first ones (30 a second, shared) a moment later.
            def has_sent(d: Proc = d) -> bool:
                return any(n == "nudgeflow_sms_sent_total" for n, _ls in d.scrape()[1])

            wait_until(has_sent, f"{d.name}'s first text", 60)
            check_exposition(d, "dispatcher", settings)
        open_now = {
            name: sum(per_label([s], "nudgeflow_open_episodes", "campaign").values())
            for name, s in mid.items()
        }
        leaving = max(workers, key=lambda w: open_now[w.name])
        assert open_now[leaving.name] > 0, open_now  # it holds timers that must move
        mid_consumed = sum(per_label(mid.values(), "nudgeflow_events_consumed_total").values())
        assert mid_consumed >= half

        # ---- one worker leaves while the third quarter flows; once the two survivors own its
        # partitions a fresh worker joins while the last quarter flows. One rebalance at a time:
        # Faust 0.15 crashes when a rebalance interrupts the recovery of the previous one
        # (ValueError "Offset must be a positive integer" seeking a standby partition).
        assert leaving.stop() == 0, leaving.log.read_text()
        live.remove(leaving)
        times["worker stopped"] = time.monotonic() - started
        workers = [w for w in workers if w is not leaving]
        quarter = half + (len(events) - half) // 2
        produce(settings, codec, events[half:quarter])
        wait_until(balanced, "the survivors to take over the partitions", 45)
        times["survivors balanced"] = time.monotonic() - started
        workers.append(start_worker())
        # Part of the rest while the new worker joins, the end once it reads its partitions
        # (the survivors alone would finish the whole rest before the join completes).
        three_quarters = quarter + (len(events) - quarter) // 2
        produce(settings, codec, events[quarter:three_quarters])
        wait_until(balanced, "the new worker to take its partitions", 45)
        produce(settings, codec, events[three_quarters:])
        send_flush(Producer(settings.kafka_common()), settings.topic_clickstream)
        wait_until(tape.outcome_flushes.all_complete, "the dispatchers' end-of-input", 90)
        times["outcomes complete"] = time.monotonic() - started
        assert tape.decision_flushes.all_complete()

        # ---- every live process's /metrics once the offsets are committed
        def settled() -> bool:
            views = [scrape_quietly(w) for w in workers]
            lags = [lag_partitions(v, settings.topic_clickstream) for v in views]
            worker_lag = {p: lag for view in lags for p, lag in view.items()}
            disp = [lag_partitions(scrape_quietly(d), settings.topic_decisions)
                    for d in dispatchers]  # fmt: skip
            disp_lag = {p: lag for view in disp for p, lag in view.items()}
            zero = {p: 0.0 for p in range(PARTITIONS)}
            return worker_lag == zero and disp_lag == zero and all(lags) and all(disp)

        wait_until(settled, "consumer lag 0 on every partition", 30)
        times["lag settled"] = time.monotonic() - started
        final_workers = [check_exposition(w, "worker", settings) for w in workers]
        final_dispatchers = [check_exposition(d, "dispatcher", settings) for d in dispatchers]
        wait_until(tape.at_end, "the decision and outcome topics to be read to the end", 15)
        tape.pump(1.0)
    finally:
        for p in live:
            p.terminate()  # all at once: each takes seconds to leave its group
        codes = {p.name: p.stop() for p in live}
        print("\nscaling timeline:", {k: round(v, 1) for k, v in times.items()})
        tape.close()
    assert set(codes.values()) == {0}, codes
    times["all stopped"] = time.monotonic() - started

    # ---- decisions: equal to the backtest of the same input
    withdrawn = {c["decision_id"] for c in tape.cancels if c["reason"] == "reordered"}
    final_decisions = {
        (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
        for d in tape.decisions
        if d.decision_id not in withdrawn
    }
    expected = {
        (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
        for d in run_backtest(events, load_campaigns(CAMPAIGNS)).decisions
    }
    assert len(expected) > 900
    assert final_decisions == expected

    # ---- outcomes: exactly one final outcome per decision, no text sent twice
    decided = {d.decision_id for d in tape.decisions}
    finals = Counter(o.decision_id for o in tape.outcomes if o.final)
    assert set(finals) == decided
    assert set(finals.values()) == {1}, [k for k, n in finals.items() if n > 1][:5]
    outboxes = [
        [json.loads(line) for line in (tmp_path / f"outbox{n}.jsonl").read_text().splitlines()]
        for n in range(2)
    ]
    assert all(outboxes), "both dispatchers sent texts"
    sent_ids = Counter(m["decision_id"] for box in outboxes for m in box)
    assert set(sent_ids.values()) == {1}, [k for k, n in sent_ids.items() if n > 1][:5]
    sent = {o.decision_id for o in tape.outcomes if o.status == "sent"}
    assert set(sent_ids) == sent
    status = Counter(o.status for o in tape.outcomes)
    assert status["sent"] and status["suppressed"] and status["deferred"], status

    # ---- worker counters == records on sms-decisions (the stopped worker: its last scrape)
    worker_views = [mid[leaving.name], *final_workers]
    assert per_label(worker_views, "nudgeflow_decisions_total", "campaign", "variant") == Counter(
        (d.campaign_id, metrics.variant_label(d.variant)) for d in tape.decisions
    )
    assert per_label(worker_views, "nudgeflow_decisions_cancelled_total", "campaign") == Counter(
        (c["campaign_id"],) for c in tape.cancels
    )
    consumed = per_label(worker_views, "nudgeflow_events_consumed_total", "event_type")
    vocabulary = {t for c in load_campaigns(CAMPAIGNS).enabled for t in c.event_types}
    produced = Counter((metrics.event_type_label(e.event_type, vocabulary),) for e in events)
    # At least once: a record redelivered after a rebalance is consumed (and counted) again.
    assert all(consumed[k] >= n for k, n in produced.items()), (consumed, produced)
    assert not per_label(worker_views, "nudgeflow_events_dead_lettered_total", "reason")
    assert sum(log_end_offsets(settings, settings.topic_clickstream_dlq).values()) == 0
    assert not per_label(final_workers, "nudgeflow_open_episodes", "campaign")  # all fired

    # ---- dispatcher counters == SmsOutcome records
    def outcomes_by(status_: str, label: Callable[[SmsOutcome], str]) -> Counter[tuple[str, str]]:
        return Counter((o.campaign_id, label(o)) for o in tape.outcomes if o.status == status_)

    by_variant = lambda o: metrics.variant_label(o.variant)  # noqa: E731
    by_reason = lambda o: o.reason or "none"  # noqa: E731
    d_views = final_dispatchers
    assert per_label(d_views, "nudgeflow_sms_sent_total", "campaign", "variant") == outcomes_by(
        "sent", by_variant
    )
    for name, status_ in (
        ("nudgeflow_sms_suppressed_total", "suppressed"),
        ("nudgeflow_sms_failed_total", "failed"),
        ("nudgeflow_sms_cancelled_total", "cancelled"),
    ):
        assert per_label(d_views, name, "campaign", "reason") == outcomes_by(status_, by_reason)
    segments: Counter[tuple[str, ...]] = Counter()
    for o in tape.outcomes:
        if o.status == "sent":
            segments[(o.campaign_id,)] += o.segments or 1
    assert per_label(d_views, "nudgeflow_sms_segments_total", "campaign") == segments
    assert sum(per_label(d_views, "nudgeflow_gateway_request_seconds_count").values()) == len(
        sent_ids
    )
    assert not per_label(d_views, "nudgeflow_gateway_throttled_total")
    assert not per_label(d_views, "nudgeflow_sms_deferred", "campaign"), "deferred backlog left"
    assert not per_label(d_views, "nudgeflow_event_to_send_seconds_count")  # event clock

    redelivered = len(tape.decisions) - len(decided)
    print(
        f"\nscaling: {len(events)} events, {len(expected)} decisions "
        f"({redelivered} redelivered), outcomes {dict(status)}, "
        f"texts per dispatcher {[len(b) for b in outboxes]}, "
        f"events consumed {sum(consumed.values())}, "
        f"open episodes moved {open_now[leaving.name]}; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
    )
