"""Every Prometheus metric of NudgeFlow, in one registry.

Why one module: the dashboard and alert rules in ``deploy/`` name these metrics, and
tests/unit/processors/test_deploy.py checks every name they use against :data:`REGISTRY`, so a
renamed metric breaks a test instead of a dashboard. Each process (worker, dispatcher,
webhooks) imports the metrics it updates and exposes the whole registry on ``/metrics`` with
:func:`start_metrics_server`; metrics it never touches show up with no samples.

Conventions: ``nudgeflow_`` prefix, ``_total`` counters, ``_seconds`` histograms. Labels carry
campaign ids, variant ids, event types (folded into the campaigns' vocabulary) and reasons only:
never a user id, phone number or message text, so the label sets stay small and carry no
personal data.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import Counter as Tally
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# ``*_created`` series double the exposition and no dashboard here uses them.
disable_created_metrics()

OTHER = "other"
"""Label value for event types outside the campaigns' vocabulary."""
NO_VARIANT = "none"
"""Label value for decisions of a campaign without variants."""

# Event -> decision/send spans the immediate path (milliseconds) and timer-driven texts, whose
# trigger event lies minutes to hours back (an absence campaign's ``after``).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)  # fmt: skip
# A timer fires on the first tick after its deadline + allowed lateness: normally < 1 s late.
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# One HTTPS call to the SMS API: tens of milliseconds up to the client timeout.
GATEWAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# --------------------------------------------------------------------------- engine (worker)

EVENTS_CONSUMED = Counter(
    "nudgeflow_events_consumed_total",
    "Clickstream records consumed by the trigger worker, by event type (types no campaign uses "
    "are folded into 'other'; records that do not decode count as 'other').",
    ["event_type"],
    registry=REGISTRY,
)
EVENTS_DEAD_LETTERED = Counter(
    "nudgeflow_events_dead_lettered_total",
    "Clickstream records sent to the dead-letter topic, by reason (late, not_wire_format, ...).",
    ["reason"],
    registry=REGISTRY,
)
DECISIONS = Counter(
    "nudgeflow_decisions_total",
    "Trigger decisions produced to the decisions topic.",
    ["campaign", "variant"],
    registry=REGISTRY,
)
DECISIONS_CANCELLED = Counter(
    "nudgeflow_decisions_cancelled_total",
    "DecisionCancelled records produced (converted after the decision, or reordered input).",
    ["campaign"],
    registry=REGISTRY,
)
OPEN_EPISODES = Gauge(
    "nudgeflow_open_episodes",
    "Users with a pending timer (open absence episode or delayed text) on this worker's "
    "partitions; sum over workers for the total.",
    ["campaign"],
    registry=REGISTRY,
)
CAMPAIGN_ENABLED = Gauge(
    "nudgeflow_campaign_enabled",
    "1 for every enabled campaign of the loaded campaign file (for 'no sends' alerts).",
    ["campaign"],
    registry=REGISTRY,
)
EVENT_TO_DECISION = Histogram(
    "nudgeflow_event_to_decision_seconds",
    "Live clock only: wall clock at produce time minus the decision's trigger event time.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
CHECKPOINT = Histogram(
    "nudgeflow_checkpoint_seconds",
    "Trigger worker: one checkpoint, from taking the write-back buffer to its states and "
    "clickstream positions being acknowledged by the broker (streams/state/checkpoint.py).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
GC_PAUSE = Histogram(
    "nudgeflow_gc_pause_seconds",
    "Trigger worker: one pass of Python's cyclic garbage collector, which stops the event loop "
    "(streams/gcpolicy.py), by generation.",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
TICK_DELAY = Histogram(
    "nudgeflow_tick_delay_seconds",
    "Live clock only, trigger worker: wall clock when a tick starts moving its partition's time "
    "minus the tick's own time (its trip through the ticks topic and its wait for the worker).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
TIMER_LATENESS = Histogram(
    "nudgeflow_timer_lateness_seconds",
    "Live clock only: wall clock when a timer decision was produced minus (fire_at + allowed "
    "lateness), the earliest moment the engine may fire it.",
    buckets=LATENESS_BUCKETS,
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "nudgeflow_consumer_lag",
    "Records behind the log end offset, per partition owned by this process (committed offset; "
    "log start before the group's first commit).",
    ["group", "topic", "partition"],
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- dispatcher

SMS_SENT = Counter(
    "nudgeflow_sms_sent_total",
    "Texts accepted by the SMS gateway.",
    ["campaign", "variant"],
    registry=REGISTRY,
)
SMS_SUPPRESSED = Counter(
    "nudgeflow_sms_suppressed_total",
    "Decisions the policy did not send (no consent, cap, quiet hours drop, holdout, ...).",
    ["campaign", "reason"],
    registry=REGISTRY,
)
SMS_FAILED = Counter(
    "nudgeflow_sms_failed_total",
    "Decisions that failed at the gateway (permanently, or after retries).",
    ["campaign", "reason"],
    registry=REGISTRY,
)
SMS_CANCELLED = Counter(
    "nudgeflow_sms_cancelled_total",
    "Held decisions dropped by a DecisionCancelled before they were sent.",
    ["campaign", "reason"],
    registry=REGISTRY,
)
SMS_DEFERRED = Gauge(
    "nudgeflow_sms_deferred",
    "Decisions currently held for later (quiet hours), by campaign. Sum over dispatchers: the "
    "backlog is shared and the instance that releases a send counts it down, so one instance's "
    "value can be negative.",
    ["campaign"],
    registry=REGISTRY,
)
SMS_SEGMENTS = Counter(
    "nudgeflow_sms_segments_total",
    "SMS segments sent (what the gateway bills).",
    ["campaign"],
    registry=REGISTRY,
)
GATEWAY_REQUEST = Histogram(
    "nudgeflow_gateway_request_seconds",
    "Duration of one SMS gateway request, successful or not.",
    buckets=GATEWAY_BUCKETS,
    registry=REGISTRY,
)
GATEWAY_THROTTLED = Counter(
    "nudgeflow_gateway_throttled_total",
    "Gateway requests rejected for throughput (HTTP 429 or Vonage status 1) and retried.",
    registry=REGISTRY,
)
DISPATCHER_REDIS_UP = Gauge(
    "nudgeflow_dispatcher_redis_up",
    "1 while the dispatcher reaches Redis; 0 during an outage (consumption paused, no texts).",
    registry=REGISTRY,
)
EVENT_TO_SEND = Histogram(
    "nudgeflow_event_to_send_seconds",
    "Trigger event time to gateway acceptance (live clock).",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- webhooks

DELIVERY_RECEIPTS = Counter(
    "nudgeflow_delivery_receipts_total",
    "Gateway delivery receipts received, by campaign and final status (delivered, failed, ...).",
    ["campaign", "status"],
    registry=REGISTRY,
)
OPT_OUTS = Counter(
    "nudgeflow_opt_outs_total",
    "Contacts who opted out by keyword (STOP, ...), by the campaign of their last text "
    "('unknown' when none).",
    ["campaign"],
    registry=REGISTRY,
)
LINK_CLICKS = Counter(
    "nudgeflow_link_clicks_total",
    "Tracked short-link clicks.",
    ["campaign", "variant"],
    registry=REGISTRY,
)
CONVERSIONS = Counter(
    "nudgeflow_conversions_total",
    "Conversions attributed to a text (or to a holdout decision).",
    ["campaign", "variant"],
    registry=REGISTRY,
)
WEBHOOK_SIGNATURE_FAILURES = Counter(
    "nudgeflow_webhook_signature_failures_total",
    "Webhook requests rejected for a missing, wrong or stale signature.",
    ["endpoint"],
    registry=REGISTRY,
)


# --------------------------------------------------------------------------- label helpers


def event_type_label(event_type: str, vocabulary: Collection[str]) -> str:
    """``event_type`` if a campaign uses it, else ``other``: producers may send any type, and
    an unbounded label set would blow up Prometheus."""
    return event_type if event_type in vocabulary else OTHER


def variant_label(variant: str | None) -> str:
    """Variant id, or ``none`` for campaigns without variants (an empty label is ambiguous)."""
    return variant or NO_VARIANT


# --------------------------------------------------------------------------- engine helpers


def record_decision(
    campaign: str,
    variant: str | None,
    *,
    trigger_ts_ms: int,
    fire_at_ms: int,
    now_ms: int,
    live: bool,
    allowed_lateness_ms: int,
) -> None:
    """Count a produced decision; with the live clock also observe its latencies.

    A decision is timer-driven when it fires after its trigger event (``fire_at > trigger_ts``):
    only those have a timer lateness. In event-clock replays wall time says nothing about event
    time, so no latency is observed.
    """
    DECISIONS.labels(campaign, variant_label(variant)).inc()
    if not live:
        return
    EVENT_TO_DECISION.observe(max(0.0, (now_ms - trigger_ts_ms) / 1000))
    if fire_at_ms > trigger_ts_ms:
        TIMER_LATENESS.observe(max(0.0, (now_ms - fire_at_ms - allowed_lateness_ms) / 1000))


class PartitionedGauge:
    """A per-label gauge whose value is the sum of per-partition counts over the partitions
    this process owns.

    Why: a worker keeps counts for every partition it has seen (the in-memory table may still
    hold keys of partitions it lost in a rebalance); only the owned ones may be reported, or
    the sum over workers would count a partition twice. The owned total is kept alongside, so
    an update costs O(labels changed) (the worker calls it for every state change).
    """

    def __init__(self, gauge: Gauge, labels: Iterable[str] = ()) -> None:
        self.gauge = gauge
        self.known = frozenset(labels)
        self.counts: dict[int, Tally[str]] = {}
        self.owned: frozenset[int] = frozenset()
        self._totals: Tally[str] = Tally()  # over the owned partitions
        self._children: dict[str, Any] = {}
        self._lock = threading.Lock()
        for label in self.known:
            self._child(label).set(0)

    def reset(self, counts: Mapping[int, Mapping[str, int]], owned: Iterable[int]) -> None:
        """Replace every count (after a rebalance) and publish all labels."""
        with self._lock:
            self.counts = {p: Tally(c) for p, c in counts.items()}
            self.owned = frozenset(owned)
            self._totals = Tally()
            for p in self.owned:
                self._totals.update(self.counts.get(p, {}))
            labels = set(self.known)
            for c in self.counts.values():
                labels.update(c)
            self._publish(labels)

    def clear(self) -> None:
        """Forget everything (partitions revoked); the gauge reads 0 until the next reset."""
        self.reset({}, ())

    def change(self, partition: int, before: Iterable[str], after: Iterable[str]) -> None:
        """One user of ``partition`` moved from the label set ``before`` to ``after``."""
        old = before if type(before) is frozenset else frozenset(before)
        new = after if type(after) is frozenset else frozenset(after)
        if old == new:
            return
        with self._lock:
            counts = self.counts.get(partition)
            if counts is None:  # (not setdefault: that builds a Counter on every call)
                counts = self.counts[partition] = Tally()
            owned = partition in self.owned
            totals = self._totals
            for label in old - new:
                counts[label] -= 1
                if owned:
                    totals[label] -= 1
            for label in new - old:
                counts[label] += 1
                if owned:
                    totals[label] += 1
            if owned:
                self._publish(old ^ new)

    def add(self, partition: int, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` (label -> users in minus users out) to ``partition``'s counts: many
        :meth:`change` calls in one update."""
        with self._lock:
            counts = self.counts.get(partition)
            if counts is None:
                counts = self.counts[partition] = Tally()
            counts.update(deltas)
            if partition in self.owned:
                self._totals.update(deltas)
                self._publish([label for label, n in deltas.items() if n])

    def value(self, label: str) -> int:
        return self._totals[label]

    def _child(self, label: str) -> Any:
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self.gauge.labels(label)
        return child

    def _publish(self, labels: Iterable[str]) -> None:
        totals = self._totals
        for label in labels:
            self._child(label).set(max(0, totals[label]))


_lag_labels: dict[str, set[tuple[str, str]]] = {}
_lag_lock = threading.Lock()


def set_consumer_lag(group: str, lags: Mapping[tuple[str, int], int]) -> None:
    """Publish ``{(topic, partition): lag}`` for ``group`` as this process's whole view: label
    sets of partitions it no longer owns are removed, so a rebalance leaves no stale series."""
    with _lag_lock:
        current = {(topic, str(partition)) for topic, partition in lags}
        for topic, part in _lag_labels.get(group, set()) - current:
            try:
                CONSUMER_LAG.remove(group, topic, part)
            except KeyError:
                pass
        for (topic, partition), lag in lags.items():
            CONSUMER_LAG.labels(group, topic, str(partition)).set(max(0, int(lag)))
        _lag_labels[group] = current


def confluent_consumer_lag(consumer: Any, timeout: float = 5.0) -> dict[tuple[str, int], int]:
    """Lag of every partition assigned to a confluent-kafka ``consumer``: log end offset minus
    the group's committed offset (the position before the first commit, the log start if that
    is unknown too). For the dispatcher; pass the result to :func:`set_consumer_lag`."""
    assigned = consumer.assignment()
    if not assigned:
        return {}
    committed = {
        (tp.topic, tp.partition): tp.offset for tp in consumer.committed(assigned, timeout)
    }
    positions = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(assigned)}
    lags: dict[tuple[str, int], int] = {}
    for tp in assigned:
        key = (tp.topic, tp.partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        offset = committed.get(key, -1)
        if offset < 0:
            offset = positions.get(key, -1)
        lags[key] = high - max(offset, low) if offset >= 0 else high - low
    return lags


# --------------------------------------------------------------------------- exposition


class MetricsServerError(RuntimeError):
    """``/metrics`` could not be served (port in use, no permission); the message says which."""


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> WSGIServer | None:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``port`` 0 means disabled (returns None): tests and the embedded demo run several processes
    on one host. Returns the HTTP server (``.shutdown()`` stops it).
    """
    if port == 0:
        return None
    if not 0 < port < 65536:
        raise MetricsServerError(f"metrics port must be 0 (off) or 1..65535, got {port}")
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise MetricsServerError(
            f"cannot serve /metrics on {addr}:{port}: {exc.strerror}"
        ) from None
    return server


def exposition(registry: CollectorRegistry = REGISTRY) -> str:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry).decode()


def write_text(path: Path | str, text: str | None = None) -> Path:
    """Write ``text`` (default: this process's exposition) to ``path`` atomically, so a reader
    never sees half a file."""
    path = Path(path)
    body = exposition() if text is None else text
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_expositions(texts: Iterable[str], *, nudgeflow_only: bool = True) -> str:
    """One exposition from several processes' (the demo's worker + dispatcher + webhooks):
    samples with the same name and labels are added, which is right for counters, histograms
    and the per-process gauges here (each process reports only its own partitions).

    ``nudgeflow_only`` drops ``process_*``/``python_*`` series, whose sum means nothing.
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if nudgeflow_only and not family.name.startswith("nudgeflow_"):
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            acc = values[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                acc[key] = acc.get(key, 0.0) + s.value
    for name, metric in merged.items():
        for (sample, labels), value in values[name].items():
            metric.add_sample(sample, dict(labels), value)
    return generate_latest(_Families(list(merged.values()))).decode()  # type: ignore[arg-type]


def sample_value(name: str, labels: Mapping[str, str] | None = None) -> float:
    """Current value of one sample of :data:`REGISTRY` (0.0 when it has none yet)."""
    value = REGISTRY.get_sample_value(name, dict(labels or {}))
    return 0.0 if value is None else value


def exposed_names(registry: CollectorRegistry = REGISTRY) -> frozenset[str]:
    """Every sample name ``registry`` can expose (``_total`` counters, ``_bucket``/``_sum``/
    ``_count`` histograms), whether or not it has samples yet: what PromQL may reference."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(s.name for s in family.samples)
    return frozenset(names)
