"""Pieces shared by the benchmarks (not a benchmark itself: ``bench/run.py`` skips ``_*`` files).

Everything here is bench-only: a gateway that sleeps instead of calling Vonage, a thread that
reads the decisions topic, campaign files with short timers, percentiles and process sizes.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from processors.gateways.base import SendResult, SmsMessage
from processors.settings import REPO_ROOT, Settings
from schemas.codec import Codec

EXAMPLE_CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux ``/proc``); 0 when unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_campaigns(path: Path, extra: list[dict[str, Any]], *, policy: bool = True) -> Path:
    """The example campaigns plus ``extra`` ones; ``policy=False`` drops the file-wide caps and
    quiet hours (the gateway-rate bench must not be throttled by them)."""
    doc = yaml.safe_load(EXAMPLE_CAMPAIGNS.read_text())
    doc["campaigns"] = [*doc["campaigns"], *extra]
    if not policy:
        doc.pop("caps", None)
        doc.pop("quiet_hours", None)
        for campaign in doc["campaigns"]:
            campaign.pop("caps", None)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class FakeGateway:
    """Sleeps ``latency_s`` per text and records when each request "arrived" (wall clock).

    Thread-safe; ``close()`` writes the arrivals as JSON (``[[decision_id, wall_s], ...]``) when
    an ``out`` path was given, so dispatcher subprocesses can report them.
    """

    name = "bench-fake"

    def __init__(self, latency_s: float = 0.02, out: Path | None = None) -> None:
        self.latency_s = latency_s
        self.out = out
        self.arrivals: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def send(self, msg: SmsMessage) -> SendResult:
        arrived = time.time()
        with self._lock:
            self.arrivals.append((msg.decision_id, arrived))
        time.sleep(self.latency_s)
        return SendResult(f"bench-{uuid.uuid4().hex[:12]}", None, None, None)

    def close(self) -> None:
        if self.out is not None:
            with self._lock:
                self.out.write_text(json.dumps(self.arrivals))


class DecisionWatcher:
    """A thread reading the decisions topic from the start: ``(record, create_time_ms)`` of every
    ``TriggerDecision``, in arrival order. CreateTime is when the worker handed the record to its
    producer, i.e. when the decision was made."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec(settings.schema_registry_url)
        self.decisions: list[tuple[dict[str, Any], int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="decision-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consumer = Consumer(
            {
                **self.settings.kafka_common(),
                "group.id": f"bench-watch-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
            }
        )
        topic = self.settings.topic_decisions
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    if msg.error() is not None or not msg.value():
                        continue
                    name, record = self.codec.decode(msg.value())
                    if name == "TriggerDecision":
                        with self._lock:
                            self.decisions.append((record, msg.timestamp()[1]))
        finally:
            consumer.close()

    def snapshot(self) -> list[tuple[dict[str, Any], int]]:
        with self._lock:
            return list(self.decisions)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def daytime_zone() -> str:
    """A fixed-offset zone where it is early afternoon now, so quiet hours never defer a send."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    now = datetime.now(UTC)
    for offset in range(-12, 15):
        name = f"Etc/GMT{'-' if offset >= 0 else '+'}{abs(offset)}"  # POSIX sign is inverted
        if 11 <= now.astimezone(ZoneInfo(name)).hour < 16:
            return name
    return "UTC"


def write_contacts(path: Path, users: Sequence[str]) -> Path:
    """Opted-in contacts with valid US numbers in a daytime zone, one per user."""
    zone = daytime_zone()
    rows = [
        {"user_id": u, "phone": f"+1415{5550000 + i:07d}", "consent": "opted_in",
         "timezone": zone}
        for i, u in enumerate(users)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_settings(state_dir: Path, **overrides: Any) -> Settings:
    """Dev-profile settings on the embedded stack in ``state_dir``, every topic unique."""
    suffix = uuid.uuid4().hex[:8]
    topics = {
        f: f"{getattr(Settings(), f)}-{suffix}"
        for f in Settings.model_fields
        if f.startswith("topic_")
    }
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        web_port = int(s.getsockname()[1])  # not 6066: benchmarks and dev workers may run at once
    return Settings.load(
        profile="dev",
        state_dir=state_dir,
        worker_id=f"bench-worker-{suffix}",
        worker_web_port=web_port,
        dispatcher_group=f"bench-dispatcher-{suffix}",
        **{**topics, **overrides},
    )
