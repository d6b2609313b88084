"""Prometheus metrics: the helpers of processors.metrics, and a real ``nudgeflow worker``'s
``/metrics`` agreeing with what it produced (embedded Apache Kafka broker, worker as a subprocess).

The event-clock test also runs the worker on the production store (RocksDB via rocksdict) and
restarts it on the same data directory: the open-episode gauge is rebuilt from the recovered
table and the flush fires every timer exactly once.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from processors import metrics
from processors.devstack.processes import free_ports
from processors.settings import Settings
from schemas.codec import Codec
from streams.reader import offsets_group
from tests.integration.test_streams_smoke import (
    MINUTE,
    T0,
    TopicReader,
    WorkerProcess,
    click,
    decisions_of,
    produce_clicks,
    produce_flush,
    produce_raw,
    worker_env,
    worker_launcher,
)

CAMPAIGNS = """
campaigns:
  - id: cart-recovery
    trigger: {type: absence, start: [add_to_cart], cancel: [purchase], after: 30m}
    message: {template: "Your cart is waiting"}
  - id: signup-thanks
    trigger: {type: event, event: event_signup}
    message: {template: "Thanks for signing up"}
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    return free_ports(1)[0]


def scrape(port: int) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name and v}


def wait_for(
    port: int, ok: Callable[[Samples], bool], worker: WorkerProcess, timeout: float = 30.0
) -> Samples:
    """Scrape until ``ok`` holds (the worker updates counters as it goes)."""
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        worker.assert_alive()
        try:
            _, samples = scrape(port)
        except OSError:
            samples = {}  # server not up yet
        if samples and ok(samples):
            return samples
        time.sleep(0.3)
    pytest.fail(f"metrics never matched; last scrape: {sorted(samples.items())[:80]}")


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    yield from worker_launcher(tmp_path, CAMPAIGNS)


# ---------------------------------------------------------------- the worker's /metrics


def test_worker_metrics_match_what_it_produced_across_a_rocksdb_restart(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    codec = Codec(settings.schema_registry_url)
    port = free_port()
    env = worker_env(settings, metrics_port=port, worker_store="rocksdb://")
    out = TopicReader(settings, settings.topic_decisions)
    users = {f"u{i}" for i in range(1, 7)}
    try:
        w1 = start_worker(env, "event")
        produce_clicks(
            settings,
            codec,
            [
                click("e1", "u1", "add_to_cart", T0),
                click("e2", "u2", "add_to_cart", T0),
                click("e3", "u2", "purchase", T0 + 5 * MINUTE),  # converted: no episode
                click("e4", "u3", "add_to_cart", T0),
                click("e5", "u4", "event_signup", T0),  # immediate decision
                click("e6", "u5", "page_view", T0),  # no campaign reads it: "other"
                click("e7", "u5", "page_view", T0 + MINUTE),
                click("e1", "u1", "add_to_cart", T0),  # duplicate: consumed, not dead-lettered
                click("e8", "u1", "add_to_cart", T0 - 60 * MINUTE),  # behind the watermark
            ],
        )
        produce_raw(settings, b"u9", b"not avro")
        consumed = {"add_to_cart": 5, "purchase": 1, "event_signup": 1, "other": 3}
        s1 = wait_for(
            port,
            lambda s: (
                by_label(s, "nudgeflow_events_consumed_total", "event_type") == consumed
                and sum(by_label(s, "nudgeflow_events_dead_lettered_total", "reason").values()) == 2
            ),
            w1,
        )
        assert by_label(s1, "nudgeflow_events_dead_lettered_total", "reason") == {
            "late": 1,
            "not_wire_format": 1,
        }
        assert by_label(s1, "nudgeflow_decisions_total", "campaign") == {"signup-thanks": 1}
        assert value(s1, "nudgeflow_decisions_total", campaign="signup-thanks", variant="none")
        assert value(s1, "nudgeflow_open_episodes", campaign="cart-recovery") == 2  # u1, u3
        assert value(s1, "nudgeflow_open_episodes", campaign="signup-thanks") == 0
        assert value(s1, "nudgeflow_campaign_enabled", campaign="cart-recovery") == 1
        # Event clock: wall time says nothing about event time, so no latency is observed.
        assert value(s1, "nudgeflow_event_to_decision_seconds_count") == 0
        assert value(s1, "nudgeflow_timer_lateness_seconds_count") == 0
        labels = {v for (_, ls) in s1 for _, v in ls}
        assert not labels & (users | {"u9"}), "a user id reached a metric label"
        code, _ = w1.stop()
        assert code == 0, w1.log.read_text()
        # The production store really is RocksDB: one database per table partition.
        assert list((tmp_path / "faust-data").rglob("user_state-*.db/CURRENT"))

        # Restart on the same RocksDB data: one new cart touches a partition, which rebuilds the
        # timer index and the episode counts from the recovered table.
        w2 = start_worker(env, "event")
        produce_clicks(settings, codec, [click("e9", "u6", "add_to_cart", T0)])
        wait_for(
            port, lambda s: value(s, "nudgeflow_open_episodes", campaign="cart-recovery") == 3, w2
        )
        produce_flush(settings)
        s2 = wait_for(
            port,
            lambda s: (
                value(s, "nudgeflow_decisions_total", campaign="cart-recovery", variant="none") >= 3
                and value(s, "nudgeflow_open_episodes", campaign="cart-recovery") == 0
            ),
            w2,
        )
        out.drain(2.0)
        records = [r for name, r in decisions_of(codec, out.messages) if name == "TriggerDecision"]
        per_campaign: dict[str, int] = {}
        for r in records:
            per_campaign[r["campaign_id"]] = per_campaign.get(r["campaign_id"], 0) + 1
        assert per_campaign == {"cart-recovery": 3, "signup-thanks": 1}, records
        assert {r["user_id"] for r in records if r["campaign_id"] == "cart-recovery"} == {
            "u1",
            "u3",
            "u6",
        }
        # Counters of both processes together equal the records on the decisions topic.
        _, s2 = scrape(port)
        assert by_label(s2, "nudgeflow_decisions_total", "campaign") == {"cart-recovery": 3}
        assert by_label(s2, "nudgeflow_events_consumed_total", "event_type") == {"add_to_cart": 1}

        # Consumer lag per clickstream partition of the worker's group, back to 0 once the flush
        # records are committed.
        def clickstream_lag(s: Samples) -> dict[str, float]:
            return {
                dict(k)["partition"]: v
                for (n, k), v in s.items()
                if n == "nudgeflow_consumer_lag" and dict(k)["topic"] == settings.topic_clickstream
            }

        zero = {str(p): 0.0 for p in range(settings.partitions)}
        s3 = wait_for(port, lambda s: clickstream_lag(s) == zero, w2, timeout=20)
        groups = {dict(k)["group"] for (n, k) in s3 if n == "nudgeflow_consumer_lag"}
        assert groups == {offsets_group(settings.worker_id)}
        code, _ = w2.stop()
        assert code == 0, w2.log.read_text()
    finally:
        out.close()


def test_live_worker_observes_event_to_decision_and_timer_lateness(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    codec = Codec(settings.schema_registry_url)
    port = free_port()
    w = start_worker(worker_env(settings, metrics_port=port, allowed_lateness_s=1), "live")
    now = int(time.time() * 1000)
    produce_clicks(
        settings,
        codec,
        [
            click("e1", "u-old", "add_to_cart", now - 31 * MINUTE),  # due: a tick fires it
            click("e2", "u-new", "add_to_cart", now),  # open for 30 more minutes
        ],
    )
    s = wait_for(
        port, lambda s: value(s, "nudgeflow_timer_lateness_seconds_count") >= 1, w, timeout=40
    )
    assert value(s, "nudgeflow_decisions_total", campaign="cart-recovery", variant="none") == 1
    assert value(s, "nudgeflow_event_to_decision_seconds_count") == 1
    # trigger_ts is the cart's time: 31 minutes (plus processing) before the decision.
    assert 31 * 60 <= value(s, "nudgeflow_event_to_decision_seconds_sum") < 31 * 60 + 30
    # Deadline now-1m + 1 s lateness: fired by the first tick, so only seconds late at most.
    assert value(s, "nudgeflow_timer_lateness_seconds_sum") < 30 + 60
    assert value(s, "nudgeflow_open_episodes", campaign="cart-recovery") == 1  # u-new
    assert value(s, "nudgeflow_timer_lateness_seconds_bucket", le="+Inf") == 1
    s = wait_for(
        port,
        lambda s: any(
            n == "nudgeflow_consumer_lag" and dict(k)["topic"] == settings.topic_clickstream
            for (n, k) in s
        ),
        w,
        timeout=20,
    )
    code, _ = w.stop()
    assert code == 0, w.log.read_text()


# ---------------------------------------------------------------- helpers (no broker)


def test_event_type_and_variant_labels_are_bounded() -> None:
    vocab = frozenset({"add_to_cart", "purchase"})
    assert metrics.event_type_label("add_to_cart", vocab) == "add_to_cart"
    assert metrics.event_type_label("anything-a-producer-invents", vocab) == "other"
    assert metrics.variant_label(None) == "none"
    assert metrics.variant_label("quick") == "quick"


def test_record_decision_observes_latency_only_with_the_live_clock() -> None:
    def counts() -> tuple[float, float, float]:
        return (
            metrics.sample_value("nudgeflow_decisions_total", {"campaign": "t-c", "variant": "a"}),
            metrics.sample_value("nudgeflow_event_to_decision_seconds_count"),
            metrics.sample_value("nudgeflow_timer_lateness_seconds_count"),
        )

    d0, e0, l0 = counts()
    lat0 = metrics.sample_value("nudgeflow_timer_lateness_seconds_sum")
    common = {"now_ms": 100_000, "allowed_lateness_ms": 1_000}
    metrics.record_decision("t-c", "a", trigger_ts_ms=0, fire_at_ms=0, live=False, **common)
    assert counts() == (d0 + 1, e0, l0)
    # Immediate (fire_at == trigger_ts): a latency, no timer lateness.
    metrics.record_decision(
        "t-c", "a", trigger_ts_ms=90_000, fire_at_ms=90_000, live=True, **common
    )
    assert counts() == (d0 + 2, e0 + 1, l0)
    # Timer: fired at 100 s for a deadline of 96 s with 1 s lateness -> 3 s late.
    metrics.record_decision("t-c", "a", trigger_ts_ms=0, fire_at_ms=96_000, live=True, **common)
    assert counts() == (d0 + 3, e0 + 2, l0 + 1)
    assert metrics.sample_value("nudgeflow_timer_lateness_seconds_sum") == pytest.approx(lat0 + 3)


def test_partitioned_gauge_reports_only_owned_partitions() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("t_open", "test", ["campaign"], registry=registry)
    g = metrics.PartitionedGauge(gauge, ["a", "b"])

    def read(label: str) -> float | None:
        return registry.get_sample_value("t_open", {"campaign": label})

    assert (read("a"), read("b")) == (0, 0)  # every known campaign is exported from the start
    g.reset({0: {"a": 2}, 1: {"a": 5, "b": 1}, 7: {"a": 100}}, owned=[0, 1])  # 7: a lost one
    assert (read("a"), read("b")) == (7, 1)
    g.change(1, before={"a"}, after={"b"})
    g.change(0, before=set(), after={"a"})
    g.change(7, before=set(), after={"a", "b"})  # not owned: no effect on the reading
    assert (read("a"), read("b")) == (7, 2)
    g.clear()
    assert (read("a"), read("b")) == (0, 0)


def test_consumer_lag_forgets_partitions_no_longer_owned() -> None:
    metrics.set_consumer_lag("t-group", {("clicks", 0): 5, ("clicks", 1): 7})
    lag = lambda p: metrics.REGISTRY.get_sample_value(  # noqa: E731
        "nudgeflow_consumer_lag", {"group": "t-group", "topic": "clicks", "partition": p}
    )
    assert (lag("0"), lag("1")) == (5, 7)
    metrics.set_consumer_lag("t-group", {("clicks", 1): 2})
    assert (lag("0"), lag("1")) == (None, 2)


def test_metrics_server_serves_the_registry_and_reports_a_busy_port(tmp_path: Path) -> None:
    assert metrics.start_metrics_server(0) is None
    with pytest.raises(metrics.MetricsServerError, match="1..65535"):
        metrics.start_metrics_server(70_000)
    port = free_port()
    server = metrics.start_metrics_server(port, addr="127.0.0.1")
    assert server is not None
    try:
        metrics.EVENTS_CONSUMED.labels("t-served").inc()
        text, samples = scrape(port)
        assert value(samples, "nudgeflow_events_consumed_total", event_type="t-served") >= 1
        assert "# TYPE nudgeflow_sms_sent_total counter" in text
        assert "_created" not in text
        with pytest.raises(metrics.MetricsServerError, match=f"127.0.0.1:{port}"):
            metrics.start_metrics_server(port, addr="127.0.0.1")
    finally:
        server.shutdown()
        server.server_close()
    path = metrics.write_text(tmp_path / "out" / "metrics.prom")
    assert "nudgeflow_events_consumed_total" in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["metrics.prom"]  # no temp file left


def test_merge_expositions_adds_samples_of_every_process() -> None:
    def process(sent: int, lag: int, partition: str) -> str:
        registry = CollectorRegistry()
        c = Counter("nudgeflow_sms_sent_total", "s", ["campaign"], registry=registry)
        c.labels("cart").inc(sent)
        g = Gauge("nudgeflow_consumer_lag", "l", ["partition"], registry=registry)
        g.labels(partition).set(lag)
        Counter("process_whatever_total", "p", registry=registry).inc()
        from prometheus_client import generate_latest

        return generate_latest(registry).decode()

    merged = metrics.merge_expositions([process(2, 4, "0"), process(3, 1, "1")])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(merged)
        for s in f.samples
    }
    assert samples == {
        ("nudgeflow_sms_sent_total", (("campaign", "cart"),)): 5,
        ("nudgeflow_consumer_lag", (("partition", "0"),)): 4,
        ("nudgeflow_consumer_lag", (("partition", "1"),)): 1,
    }


def test_exposed_names_cover_histogram_and_counter_series() -> None:
    names = metrics.exposed_names()
    assert {
        "nudgeflow_events_consumed_total",
        "nudgeflow_event_to_send_seconds_bucket",
        "nudgeflow_event_to_send_seconds_sum",
        "nudgeflow_event_to_send_seconds_count",
        "nudgeflow_consumer_lag",
        "nudgeflow_sms_deferred",
    } <= names
    assert "nudgeflow_events_consumed" not in names
