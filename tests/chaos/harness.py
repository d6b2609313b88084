"""The chaos harness: the whole pipeline as real processes, faults injected, invariants checked.

What runs (every piece real, nothing of ours mocked):

* an Apache Kafka broker behind :mod:`tests.chaos.proxy`: the broker advertises the proxy's
  port, so every client's traffic can be cut (a network partition), and the broker itself can be
  SIGKILLed and restarted on the same log directory (a crash);
* redis-server with an append-only file fsynced on every write (``appendfsync always``), the
  production recommendation (docs/chaos.md): a SIGKILL + restart keeps every acknowledged write;
* ``nudgeflow worker`` and ``nudgeflow dispatcher`` processes (event clock, so the decisions can
  be compared with ``nudgeflow backtest``), the dispatchers sending through the real Vonage SDK to
  the HTTPS fake of ``tests/fakes/vonage_fake.py``, under a supervisor that restarts any process
  that exits (what Kubernetes or systemd does);
* a feeder replaying a ``nudgeflow simulate`` stream at a controllable rate, an observer reading
  decisions, outcomes and the dead-letter topic, and a sampler of every process's RSS.

Options: ``redis_cluster=True`` runs a local Redis Cluster instead of the single redis-server
(:meth:`Chaos.fail_redis_master` kills the master of a key), ``partitions`` sets the topics'
partition count, and :meth:`Chaos.add` / :meth:`Chaos.retire` start and SIGTERM workers and
dispatchers at run time, each a rebalance whose pause :class:`Pulse` times.

:meth:`Chaos.report` turns what happened into a :class:`Report` whose ``line`` is the summary
``kills=… lost=… duplicates=… redis_restarts=… broker_outages=… broker_crashes=…
broker_freezes=… gateway_faults=… dlq=…``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from pydantic import SecretStr

from processors.commands.backtest import run_backtest
from processors.commands.contacts import import_contacts
from processors.commands.produce import send_flush
from processors.core.campaign import CampaignSet, load_campaigns
from processors.core.cap import GLOBAL_SCOPE
from processors.core.decision import Decision
from processors.core.events import ClickEvent
from processors.core.quiet_hours import quiet_until
from processors.devstack import broker_healthy, create_topics, redis_binary
from processors.devstack.redis_cluster import ClusterNode, LocalRedisCluster
from processors.dispatcher import DLQ_REASON_HEADER
from processors.kafka.control import FlushTracker, is_control
from processors.settings import REPO_ROOT, Settings
from schemas.codec import Codec
from streams.reader import offsets_group
from tests.fakes.vonage_fake import Reply, VonageFake
from tests.support.kafka_process import KafkaProcess

UNKNOWN_AFTER_CRASH = "unknown_after_crash"
UNKNOWN_PREFIX = "unknown_after_"  # crash, timeout, connection_lost: the text may have gone out
# Gateway failures in which the request never reached the gateway (so the fake never saw it):
# retried, and dead-lettered like any other gateway failure when the retries run out.
CONNECT_REASONS = frozenset({"connect_timeout", "connection_error", "tls_error"})
GATEWAY_TIMEOUT_S = 1.0  # the dispatchers' Vonage timeout: short, so timeout faults are quick
RATE_PER_S = 30  # Vonage's default account limit, the dispatcher's default
FEED_LINGER_MS = 5  # the clickstream feeder's producer batching (librdkafka's default)
FAIL_CLOSED_GRACE_S = 1.5  # a request that passed its checks before Redis died may still land
REDIS_BACK_GRACE_S = 10.0  # an exit this soon after Redis is back still counts as the outage's
LATE_S = GATEWAY_TIMEOUT_S + 0.6  # an answer this late is past the client's timeout

# The gateway fault mix: (weight, behaviour). Three kinds (docs/chaos.md):
# * retryable: the gateway answered "not taken" (throttling, 429, 5xx); retried with backoff;
# * permanent: barred, non-whitelisted; failed at once, dead-lettered;
# * ambiguous: the request reached the gateway and its answer was lost (connection dropped,
#   answer past the client's timeout), half of them after the gateway took the text. The
#   dispatcher cannot tell which: the decision ends ``failed: unknown_after_*``, never retried,
#   not dead-lettered. That is an outcome, not a loss: at most one text per decision.
# Connection faults before any request (refused, reset TLS handshakes) are injected as timed
# windows by :meth:`Chaos.gateway_faults`: retryable, and invisible to the fake's request log.
FAULT_MIX: tuple[tuple[int, str | Reply], ...] = (
    (36, "ok"),
    (15, "throttle"),
    (13, "http429"),
    (13, "http500"),
    (6, "http503"),
    (3, "close"),  # dropped before answering, took nothing
    (3, "took:close"),  # took the text, then dropped the connection
    (2, "took:reset"),  # took the text, then reset the connection
    (2, Reply(delay_s=LATE_S)),  # took the text, answered after the timeout
    (2, Reply("http", http_status=503, delay_s=LATE_S)),  # took nothing, answered late
    (3, "status:7"),  # number barred: permanent
    (2, "status:29"),  # non-whitelisted destination: permanent
)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (Linux), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def accepted(reply: Reply) -> bool:
    """Whether the fake took the text (a real gateway would have sent it)."""
    return reply.kind in ("ok", "partial")


def faulty(reply: Reply) -> bool:
    return reply.kind != "ok" or reply.delay_s > 0 or reply.lose is not None


def ambiguous(reply: Reply) -> bool:
    """Whether the client lost the answer to a request the gateway received (dropped or too
    late): the dispatcher must not send that decision again, whatever the gateway did."""
    return reply.kind == "close" or reply.lose is not None or reply.delay_s >= GATEWAY_TIMEOUT_S


def contacts_for(users: int, seed: int) -> list[dict[str, Any]]:
    """Contacts for simulate's ``u000001``…: most opted in, some opted out, unknown or missing,
    in four time zones (quiet hours defer a share of the texts)."""
    rng = random.Random(seed)
    zones = ["America/Los_Angeles", "America/New_York", "Europe/London", "Asia/Kolkata"]
    areas = ["415", "212", "312", "617", "646", "718", "213", "202"]
    rows = []
    for i in range(1, users + 1):
        roll = rng.random()
        if roll < 0.05:
            continue  # no contact at all
        consent = "opted_in" if roll < 0.87 else ("opted_out" if roll < 0.94 else "unknown")
        rows.append(
            {
                "user_id": f"u{i:06d}",
                "phone": f"+1{areas[i // 10_000 % len(areas)]}555{i % 10_000:04d}",
                "consent": consent,
                "timezone": zones[i % len(zones)],
                "first_name": f"Pat{i % 97}",
            }
        )
    return rows


def fault_script(n: int, seed: int) -> list[str | Reply]:
    rng = random.Random(seed)
    weights = [w for w, _b in FAULT_MIX]
    behaviours = [b for _w, b in FAULT_MIX]
    return rng.choices(behaviours, weights=weights, k=n)


def max_in_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """The most events in any half-open sliding window ``[t, t + window_s)``."""
    ts = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def policy_breaches(
    campaigns: CampaignSet, zones: dict[str, str], sends: Iterable[tuple[str, str, int]]
) -> tuple[int, int]:
    """Of ``sends`` (user id, campaign id, send time in ms), how many fell inside the
    recipient's quiet hours (``zones``: user id -> time zone) and how many went past a cap of
    the file (top-level or the campaign's): a rolling window ending at a send holding more
    than ``max`` sends of the rule's scope."""
    from zoneinfo import ZoneInfo

    quiet = over = 0
    by_user: dict[str, list[tuple[str, int]]] = {}
    for user, campaign_id, at in sends:
        by_user.setdefault(user, []).append((campaign_id, at))
        campaign = campaigns.get(campaign_id)
        qh = (campaign.quiet_hours if campaign else None) or campaigns.quiet_hours
        quiet += int(quiet_until(qh, at, ZoneInfo(zones[user])) is not None)
    for texts in by_user.values():
        for campaign_id, at in texts:
            campaign = campaigns.get(campaign_id)
            rules = (*(campaigns.caps or ()), *(campaign.caps if campaign else ()))
            over += int(
                any(
                    sum(
                        1
                        for c, t in texts
                        if at - rule.per_ms < t <= at and rule.scope in (GLOBAL_SCOPE, c)
                    )
                    > rule.max
                    for rule in rules
                )
            )
    return quiet, over


class CountingFake(VonageFake):
    """The Vonage fake, also counting the connections it resets in the TLS handshake: those
    requests never reach its request log, but they are faults the dispatcher had to retry.

    The fake reads ``connection_fault`` once per new connection, before the handshake."""

    handshake_resets = 0

    @property  # type: ignore[override]
    def connection_fault(self) -> Literal["stall_handshake", "reset_handshake"] | None:
        fault = self._connection_fault
        if fault is not None:
            self.handshake_resets += 1
        return fault

    @connection_fault.setter
    def connection_fault(self, fault: Literal["stall_handshake", "reset_handshake"] | None) -> None:
        self._connection_fault = fault


class StallWatch(threading.Thread):
    """Times the harness process's own stalls (no thread of it ran, e.g. CPU starvation): the
    in-process fake cannot stamp a request that arrives then, and stamps the queue at once when
    the process runs again. Ticks every 10 ms; a gap of ``STALL_S`` or more is a stall."""

    STALL_S = 0.25

    def __init__(self) -> None:
        super().__init__(name="stall-watch", daemon=True)
        self.stalls: list[tuple[float, float]] = []  # (start, end), time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        last = time.monotonic()
        while not self._halt.wait(0.01):
            now = time.monotonic()
            if now - last >= self.STALL_S:
                self.stalls.append((last, now))
            last = now

    def halt(self) -> None:
        self._halt.set()


def unmeasured(stamps: Sequence[float], stalls: Sequence[tuple[float, float]]) -> set[int]:
    """Indexes of the stamps taken within ``StallWatch.STALL_S`` after a stall ended: requests
    that may have arrived any time during it, so their stamps say nothing about the rate."""
    return {
        i
        for i, t in enumerate(stamps)
        for start, end in stalls
        if end <= t < end + StallWatch.STALL_S
    }


# --------------------------------------------------------------------------- timeline


class Timeline:
    """What the harness did and saw, with seconds since the start; printed and kept in a file."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.t0 = time.monotonic()
        self.path = path
        self.echo = echo
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        line = f"[chaos {self.now():7.1f}s] {text}"
        with self._lock:
            self.lines.append(line)
            with self.path.open("a") as fh:
                fh.write(line + "\n")
        if self.echo:
            print(line, flush=True)


# --------------------------------------------------------------------------- processes


class Service:
    """One ``nudgeflow`` process (worker or dispatcher), restartable, its log appended to."""

    def __init__(
        self, name: str, role: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.role = role
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.starts = 0
        self.expected_exit = False  # set while we kill or stop it on purpose
        self.stopped = False

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n===== start #{self.starts + 1} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
            )
        self.started_at = time.monotonic()
        self.starts += 1
        self.expected_exit = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed or committed."""
        self.expected_exit = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        self.stopped = self.expected_exit = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Supervisor(threading.Thread):
    """Restarts any service that exits on its own (with backoff), like a process manager."""

    def __init__(self, services: list[Service], timeline: Timeline) -> None:
        super().__init__(daemon=True, name="chaos-supervisor")
        self.services = services
        self.timeline = timeline
        self.crashes: list[tuple[float, str, int]] = []  # (t, service, exit code)
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._backoff: dict[str, float] = {}

    def run(self) -> None:
        while not self._halt.wait(0.25):
            for svc in self.services:
                with self._lock:
                    if svc.stopped or svc.expected_exit or svc.proc is None:
                        continue
                    code = svc.proc.poll()
                    if code is None:
                        continue
                    self.crashes.append((self.timeline.now(), svc.name, code))
                    # Quick successive crashes back off (0.5, 1, 2, 4 s), like a crash loop
                    # under a process manager; a process that ran 30 s starts fresh.
                    ran = time.monotonic() - svc.started_at
                    delay = 0.5 if ran > 30 else min(4.0, 2 * self._backoff.get(svc.name, 0.25))
                    self._backoff[svc.name] = delay
                    self.timeline.say(
                        f"{svc.name} exited by itself (code {code}); restarting in {delay:.1f}s"
                    )
                    svc.expected_exit = True  # until restarted
                threading.Timer(delay, self._restart, args=(svc,)).start()

    def _restart(self, svc: Service) -> None:
        with self._lock:
            if not svc.stopped and not svc.alive():
                svc.start()

    def kill_and_restart(self, svc: Service, after_s: float = 0.0) -> None:
        with self._lock:
            svc.kill()
            if after_s <= 0:
                svc.start()
        if after_s > 0:  # expected_exit stays set, so the loop above leaves it alone
            threading.Timer(after_s, self._restart, args=(svc,)).start()

    def halt(self) -> None:
        self._halt.set()


class RedisServer:
    """redis-server with an fsync-always AOF: ``kill`` + ``start`` keeps every acknowledged
    write."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "redis.log"
        self.argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1"]
        self.argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.argv += ["--daemonize", "no", "--dir", str(workdir)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.log}")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Broker:
    """Apache Kafka on a private port behind the outage proxy; clients only ever see the proxy.

    Two kinds of outage: :meth:`cut` / :meth:`restore` (the network: every connection cut, new
    ones blackholed) and :meth:`kill` / :meth:`restart` (the JVM SIGKILLed, then started again
    on the same log directory and ports).
    """

    def __init__(self, workdir: Path) -> None:
        (self.proxy_port,) = free_ports(1)
        self.workdir = workdir
        self.kafka = KafkaProcess(workdir / "broker", advertised_port=self.proxy_port)
        self.proxy: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def kafka_port(self) -> int:
        return self.kafka.node.port

    def start(self) -> None:
        """The proxy first: the broker advertises it, so a client may call it at once."""
        proxy = [sys.executable, "-m", "tests.chaos.proxy", "--listen", str(self.proxy_port)]
        proxy += ["--upstream", str(self.kafka_port)]
        self.proxy_log = self.workdir / "proxy.log"
        with self.proxy_log.open("ab") as out:
            self.proxy = subprocess.Popen(
                proxy, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
            )
        self.kafka.start()
        deadline = time.monotonic() + 30
        while not broker_healthy(self.bootstrap, timeout=1.0):
            if self.proxy.poll() is not None:
                raise RuntimeError(f"proxy exited during start-up; see {self.workdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker not reachable through the proxy; see {self.workdir}")
            time.sleep(0.1)

    def _signal_proxy(self, sig: int, word: str) -> None:
        assert self.proxy is not None
        seen = self.proxy_log.read_text().count(word)
        self.proxy.send_signal(sig)
        deadline = time.monotonic() + 5
        while self.proxy_log.read_text().count(word) <= seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not acknowledge {word}")
            time.sleep(0.02)

    def cut(self) -> None:
        self._signal_proxy(signal.SIGUSR1, "paused")

    def restore(self) -> None:
        self._signal_proxy(signal.SIGUSR2, "resumed")

    def kill(self) -> None:
        self.kafka.kill()

    def restart(self) -> None:
        self.kafka.start()

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        self.kafka.stop()


# --------------------------------------------------------------------------- feeder, observer


class _Loop(threading.Thread):
    """A daemon thread whose ``_run`` error is kept in ``error`` for the harness to report, and
    that stops when :meth:`halt` sets ``_halt``."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the harness
            self.error = exc

    def _run(self) -> None:
        raise NotImplementedError

    def halt(self) -> None:
        self._halt.set()


class Feeder(_Loop):
    """Produces the events in order (keyed by user) at ``rate`` per second, up to ``limit``."""

    def __init__(self, settings: Settings, events: list[ClickEvent]) -> None:
        super().__init__("chaos-feeder")
        self.settings = settings
        self.events = events
        self.sent = 0
        self.limit = 0
        self.rate = 1.0
        self._seg = (time.monotonic(), 0)
        self._lock = threading.Lock()
        self.failures: list[str] = []

    def feed(self, rate: float, limit: int) -> None:
        with self._lock:
            self.rate, self.limit = rate, min(limit, len(self.events))
            self._seg = (time.monotonic(), self.sent)

    @property
    def done(self) -> bool:
        return self.sent >= len(self.events)

    def _run(self) -> None:
        codec = Codec(self.settings.schema_registry_url)
        producer = Producer(
            {
                **self.settings.kafka_common(),
                "enable.idempotence": True,
                "linger.ms": FEED_LINGER_MS,
                "compression.type": "lz4",
                "log_level": 2,
            }
        )

        def on_delivery(err: object, _msg: object) -> None:
            if err is not None:
                self.failures.append(str(err))

        topic = self.settings.topic_clickstream
        while not self._halt.is_set():
            with self._lock:
                start, base = self._seg
                allowed = min(self.limit, base + int((time.monotonic() - start) * self.rate))
            if self.sent >= allowed:
                producer.poll(0.01)
                if self.done:
                    break
                continue
            while self.sent < allowed:
                e = self.events[self.sent]
                value = codec.encode("ClickEvent", e.to_record())
                while True:
                    try:
                        producer.produce(
                            topic, key=e.user_id.encode(), value=value, on_delivery=on_delivery
                        )
                        break
                    except BufferError:
                        producer.poll(0.1)
                self.sent += 1
            producer.poll(0)
        while producer.flush(5):
            if self._halt.is_set():
                break


class Observer(_Loop):
    """Reads decisions, outcomes and sms-dlq from the beginning, through the proxy like the rest."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("chaos-observer")
        self.settings = settings
        self.decisions: dict[str, Decision] = {}
        self.withdrawn: set[str] = set()
        self.outcomes: list[dict[str, Any]] = []
        self.dlq: list[tuple[str, str]] = []  # (decision id, reason header)
        self.outcome_flushes = FlushTracker(partitions=set(range(settings.partitions)))
        self.decision_flushes = FlushTracker(partitions=set(range(settings.partitions)))
        self.lock = threading.Lock()

    def _run(self) -> None:
        s = self.settings
        codec = Codec(s.schema_registry_url)
        consumer = Consumer(
            {**s.kafka_common(), "group.id": "chaos-observer", "enable.auto.commit": False,
             "log_level": 2}
        )  # fmt: skip
        topics = (s.topic_decisions, s.topic_outcomes, s.topic_sms_dlq)
        consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(s.partitions)]
        )
        try:
            while not self._halt.is_set():
                for m in consumer.consume(1000, timeout=0.2):
                    if m.error():
                        continue
                    self._take(codec, m)
        finally:
            consumer.close()

    def _take(self, codec: Codec, m: Any) -> None:
        s = self.settings
        topic, headers = m.topic(), m.headers()
        with self.lock:
            if topic == s.topic_sms_dlq:
                _name, rec = codec.decode(m.value())
                reason = dict(headers or []).get(DLQ_REASON_HEADER, b"").decode()
                self.dlq.append((rec["decision_id"], reason))
                return
            if is_control(headers):
                on_decisions = topic == s.topic_decisions
                tracker = self.decision_flushes if on_decisions else self.outcome_flushes
                tracker.observe(m.partition(), headers)
                return
            name, rec = codec.decode(m.value())
            if name == "TriggerDecision":
                self.decisions[rec["decision_id"]] = Decision.from_record(rec)
            elif name == "DecisionCancelled":
                if rec["reason"] == "reordered":
                    self.withdrawn.add(rec["decision_id"])
            elif name == "SmsOutcome":
                self.outcomes.append(rec)

    def final_outcomes(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            out: dict[str, list[dict[str, Any]]] = {}
            for o in self.outcomes:
                if o["status"] != "deferred":
                    out.setdefault(o["decision_id"], []).append(o)
            return out

    def live_decisions(self) -> dict[str, Decision]:
        with self.lock:
            return {k: d for k, d in self.decisions.items() if k not in self.withdrawn}


class RssSampler(threading.Thread):
    """Every 0.5 s: the RSS of every service process, tagged with the current phase."""

    def __init__(self, services: list[Service]) -> None:
        super().__init__(daemon=True, name="chaos-rss")
        self.services = services
        self.phase = "start"
        self.samples: list[tuple[str, str, float]] = []  # (phase, service, MB)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            for svc in self.services:
                pid = svc.pid
                if pid is None or not svc.alive():
                    continue
                mb = rss_mb(pid)
                if mb is not None:
                    self.samples.append((self.phase, svc.name, mb))

    def peak(self, role_prefix: str, phases: Iterable[str]) -> float:
        wanted = set(phases)
        values = [
            mb for ph, name, mb in self.samples if ph in wanted and name.startswith(role_prefix)
        ]
        return max(values, default=0.0)

    def halt(self) -> None:
        self._halt.set()


class Pulse(_Loop):
    """When the workers and the dispatchers wrote: the broker timestamps (ms, the producer's
    clock, this machine's) of every record on the worker's outputs (its ``user_state``
    changelog, the decisions) and the dispatchers' (the outcomes). A rebalance that stops a
    group's processing shows as a gap in its output (:meth:`longest_gap`)."""

    def __init__(self, settings: Settings, topics: dict[str, Sequence[str]]) -> None:
        super().__init__("chaos-pulse")
        self.settings = settings
        self.topics = topics  # role -> topics
        self.stamps: dict[str, list[int]] = {role: [] for role in topics}
        self.lock = threading.Lock()

    def _run(self) -> None:
        s = self.settings
        consumer = Consumer(
            {**s.kafka_common(), "group.id": "chaos-pulse", "enable.auto.commit": False,
             "log_level": 2}
        )  # fmt: skip
        role_of = {t: role for role, ts in self.topics.items() for t in ts}
        consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t in role_of for p in range(s.partitions)]
        )
        try:
            while not self._halt.is_set():
                msgs = consumer.consume(2000, timeout=0.2)
                with self.lock:
                    for m in msgs:
                        if m.error() is None:
                            self.stamps[role_of[str(m.topic())]].append(m.timestamp()[1])
        finally:
            consumer.close()

    def longest_gap(self, role: str, t0: float, t1: float) -> float:
        """The longest stretch, in seconds, without a record of ``role`` that ends in
        ``(t0, t1]`` (``time.time()`` seconds): it may start before ``t0``, at the last record
        before it."""
        with self.lock:
            ms = sorted(self.stamps[role])
        lo, hi = int(t0 * 1000), int(t1 * 1000)
        best, prev = 0, None
        for t in ms:
            if t > hi:
                best = max(best, hi - prev) if prev is not None else best
                break
            if prev is not None and t > lo:
                best = max(best, t - max(prev, lo - 60_000))
            prev = t
        else:
            if prev is not None and prev < hi:
                best = max(best, hi - max(prev, lo))
        return best / 1000

    def written(self, role: str, since: float) -> int:
        """Records of ``role`` stamped after ``since`` (``time.time()`` seconds)."""
        ms = int(since * 1000)
        with self.lock:
            return sum(1 for t in self.stamps[role] if t > ms)


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    """What a chaos run proved (or not). ``problems`` lists every broken invariant."""

    kills: int = 0
    lost: int = 0
    duplicates: int = 0
    redis_restarts: int = 0
    broker_outages: int = 0
    broker_crashes: int = 0
    broker_freezes: int = 0
    gateway_faults: int = 0
    dlq: int = 0
    events: int = 0
    decisions: int = 0
    expected_decisions: int = 0
    missing_decisions: int = 0
    extra_decisions: int = 0
    without_outcome: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    unknown: int = 0  # failed: unknown_after_* (crash, timeout, connection_lost)
    unknown_taken: int = 0  # of those, the gateway did take the text
    unknown_unprovoked: int = 0  # unknown_after_timeout/connection_lost without such a fault
    misreported: int = 0  # the gateway took the text but the final outcome says otherwise
    resent_after_ambiguous: int = 0  # requests after one whose answer the client lost
    conflicting_outcomes: int = 0
    repeated_outcomes: int = 0  # the same final outcome published again after a crash
    gateway_requests: int = 0
    texts_accepted: int = 0
    max_requests_1s: int = 0
    rate_unmeasured: int = 0  # requests stamped right after a stall of the fake's process
    harness_stalls: int = 0
    calls_while_redis_down: int = 0
    dlq_missing: int = 0
    dlq_unexpected: int = 0
    crash_restarts: int = 0
    exits_without_redis: int = 0  # dispatcher exits during a Redis outage (it should wait)
    connect_fault_s: float = 0.0
    handshake_resets: int = 0
    in_quiet_hours: int = 0  # texts sent inside the recipient's quiet hours
    over_cap: int = 0  # texts sent past a frequency cap
    rss: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # run-specific fields, end of the line
    notes: list[str] = field(default_factory=list)  # run-specific detail lines

    @property
    def line(self) -> str:
        return (
            f"kills={self.kills} lost={self.lost} duplicates={self.duplicates} "
            f"redis_restarts={self.redis_restarts} broker_outages={self.broker_outages} "
            f"broker_crashes={self.broker_crashes} broker_freezes={self.broker_freezes} "
            f"gateway_faults={self.gateway_faults} dlq={self.dlq}"
        ) + "".join(f" {k}={v}" for k, v in self.extra.items())

    def details(self) -> str:
        rss = " ".join(f"{k}={v:.0f}MB" for k, v in sorted(self.rss.items()))
        status = " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items()))
        return "\n".join(
            [
                f"events={self.events} decisions={self.decisions} "
                f"(backtest {self.expected_decisions}, missing {self.missing_decisions}, "
                f"extra {self.extra_decisions}) without_outcome={self.without_outcome}",
                f"final outcomes: {status}",
                f"unknown_after_*={self.unknown} (gateway had taken {self.unknown_taken} of "
                f"them; {self.unknown_unprovoked} timeouts/drops not injected) "
                f"resent_after_ambiguous={self.resent_after_ambiguous} "
                f"misreported={self.misreported} conflicting={self.conflicting_outcomes} "
                f"republished={self.repeated_outcomes}",
                f"gateway: requests={self.gateway_requests} texts={self.texts_accepted} "
                f"faults={self.gateway_faults} busiest_1s={self.max_requests_1s} "
                f"(limit {RATE_PER_S}; {self.rate_unmeasured} stamped after "
                f"{self.harness_stalls} stall(s) of the fake's process left out) "
                f"calls_while_redis_down={self.calls_while_redis_down} "
                f"connect_faults={self.connect_fault_s:g}s "
                f"(handshakes reset {self.handshake_resets})",
                f"dlq={self.dlq} (missing {self.dlq_missing}, unexpected {self.dlq_unexpected}) "
                f"crash_restarts={self.crash_restarts} "
                f"(dispatcher exits during Redis outages {self.exits_without_redis}) rss: {rss}",
                f"policy: texts_in_quiet_hours={self.in_quiet_hours} "
                f"texts_over_a_cap={self.over_cap}",
                *self.notes,
                f"took {self.seconds:.0f}s",
            ]
        )


class Chaos:
    """One chaos run: build with the scale, ``start()``, inject faults, ``finish()``."""

    def __init__(
        self,
        workdir: Path,
        *,
        events: int,
        users: int,
        seed: int = 7,
        workers: int = 1,
        dispatchers: int = 1,
        echo: bool = True,
        campaigns: Path = REPO_ROOT / "examples" / "campaigns.yaml",
        partitions: int = 4,
        redis_cluster: bool = False,
    ) -> None:
        from processors.simulate import generate

        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.timeline = Timeline(workdir / "timeline.log", echo)
        self.seed = seed
        self.rng = random.Random(seed)
        self.campaigns = campaigns
        self.users = users
        self.events = list(generate(users=users, events=events, seed=seed))
        self.contacts = contacts_for(users, seed)
        self.n_workers, self.n_dispatchers = workers, dispatchers
        self.partitions = partitions
        self.use_cluster = redis_cluster
        self.cluster: LocalRedisCluster | None = None
        self.redis_failovers: list[float] = []  # seconds from a master's SIGKILL to takeover
        self.membership: list[tuple[float, str, str]] = []  # (time.time(), role, what)
        self.pulse: Pulse | None = None
        self.idle_after: set[int] = set()  # membership changes after which a group ran dry
        self.kills = 0
        self.redis_restarts = 0
        self.broker_outages = 0
        self.broker_crashes = 0
        self.broker_freezes = 0
        self.redis_down: list[tuple[float, float]] = []  # monotonic windows without Redis
        self.fault_windows: list[tuple[int, int]] = []  # [start, end) request indexes
        self.connect_fault_s = 0.0  # seconds of refused / reset gateway connections
        self.services: list[Service] = []
        self.started = time.monotonic()
        self.broker: Broker | None = None
        self.redis: RedisServer | None = None
        self.fake: CountingFake | None = None

    # ------------------------------------------------------------------ set-up

    def start(self) -> None:
        say = self.timeline.say
        self.broker = Broker(self.workdir)
        self.broker.start()
        if self.use_cluster:
            self.cluster = LocalRedisCluster(self.workdir / "redis-cluster").start()
            redis_url, redis_what = self._cluster_url(), "a Redis Cluster (3 masters, 3 replicas)"
        else:
            self.redis = RedisServer(self.workdir / "redis", free_ports(1)[0])
            self.redis.start()
            redis_url, redis_what = self.redis.url, f"redis :{self.redis.port} (AOF, fsync always)"
        self.fake = CountingFake()
        self.fake.start()
        self.stall_watch = StallWatch()
        self.stall_watch.start()
        say(
            f"stack up: kafka :{self.broker.kafka_port} behind proxy :{self.broker.proxy_port}, "
            f"{redis_what}, Vonage fake :{self.fake.port}"
        )
        self.settings = Settings.load(
            profile="dev",
            state_dir=self.workdir,
            bootstrap_servers=self.broker.bootstrap,
            redis_url=redis_url,
            partitions=self.partitions,
            clock="event",
            gateway="vonage",
            campaigns_file=self.campaigns,
            vonage_rest_host=self.fake.host,
            vonage_api_key=SecretStr(self.fake.api_key),
            vonage_api_secret=SecretStr(self.fake.api_secret),
            vonage_timeout_s=GATEWAY_TIMEOUT_S,
            worker_web_port=0,
            metrics_port=0,
            worker_store="memory://",
        )
        create_topics(self.broker.bootstrap, self.settings)
        contacts = self.workdir / "contacts.jsonl"
        contacts.write_text("".join(json.dumps(r) + "\n" for r in self.contacts))
        published, _bad = import_contacts(contacts, self.settings)
        say(f"{published} contacts imported; {len(self.events)} events to replay")
        self.env = self._env()
        for _ in range(self.n_workers):
            self.services.append(self._service("worker"))
        for _ in range(self.n_dispatchers):
            self.services.append(self._service("dispatcher"))
        for svc in self.services:
            svc.start()
        self.supervisor = Supervisor(self.services, self.timeline)
        self.supervisor.start()
        self.rss = RssSampler(self.services)
        self.rss.start()
        self.observer = Observer(self.settings)
        self.observer.start()
        self.feeder = Feeder(self.settings, self.events)
        self.feeder.start()
        self.wait_ready()
        say(f"{self.n_workers} worker(s) and {self.n_dispatchers} dispatcher(s) running")

    def _cluster_url(self, avoid: Sequence[ClusterNode] = ()) -> str:
        """The services' ``redis+cluster://`` URL, its seed a node not in ``avoid``."""
        assert self.cluster is not None
        seed = next(n for n in self.cluster.nodes if n not in avoid and n.proc.poll() is None)
        return f"redis+cluster://{seed.address}"

    def _service(self, role: str) -> Service:
        """A new ``nudgeflow worker`` or ``dispatcher``, numbered after the others of its role."""
        i = len(self.by_role(role))
        exe = [sys.executable, "-m", "processors.commands.cli"]
        if role == "worker":
            argv = [*exe, "worker", "--clock", "event"]
        else:
            argv = [*exe, "dispatcher", "--retry-base", "0.2", "--rate", str(RATE_PER_S)]
        run_dir = self.workdir / "run"
        run_dir.mkdir(exist_ok=True)
        return Service(f"{role}-{i}", role, argv, dict(self.env), run_dir,
                       self.workdir / f"{role}-{i}.log")  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGEFLOW_")}
        for name in Settings.model_fields:
            value = getattr(self.settings, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"NUDGEFLOW_{name.upper()}"] = str(value)
        assert self.fake is not None
        env["REQUESTS_CA_BUNDLE"] = self.fake.ca_path
        env["PYTHONPATH"] = str(REPO_ROOT)
        level = os.environ.get("NUDGEFLOW_CHAOS_LOG_LEVEL")  # e.g. info, to debug a run
        if level:
            env["NUDGEFLOW_LOG_LEVEL"] = level
        return env

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until every dispatcher owns partitions (its log says so); the workers' progress is
        :meth:`wait_worker_progress`, once events flow."""
        deadline = time.monotonic() + timeout_s
        for svc in self.active("dispatcher"):
            while not (svc.alive() and self.assigned(svc)):
                self.check_threads()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{svc.name} did not join its group; see {svc.log}")
                time.sleep(0.2)

    def check_threads(self) -> None:
        for thread in (self.feeder, self.observer, self.pulse):
            if thread is not None and thread.error is not None:
                raise RuntimeError(f"{thread.name} failed: {thread.error!r}") from thread.error

    # ------------------------------------------------------------------ faults

    def by_role(self, role: str) -> list[Service]:
        return [s for s in self.services if s.role == role]

    def active(self, role: str | None = None) -> list[Service]:
        """The services not retired (:meth:`retire`), of ``role`` when given."""
        return [s for s in self.services if not s.stopped and role in (None, s.role)]

    @staticmethod
    def assignments(svc: Service) -> int:
        """How many assignments a worker or dispatcher has logged (each rebalance logs one)."""
        return svc.log.read_text(errors="replace").count("assigned partitions [")

    def wait_rebalanced(self, role: str, before: dict[str, int], timeout_s: float) -> bool:
        """Until every active service of ``role`` has logged an assignment since ``before``
        (name -> :meth:`assignments`); False (and said) when that takes over ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_threads()
            if all(self.assignments(s) > before.get(s.name, 0) for s in self.active(role)):
                return True
            if time.monotonic() > deadline:
                self.timeline.say(f"the {role} group did not log a new assignment everywhere")
                return False
            time.sleep(0.5)

    def add(self, role: str, timeout_s: float = 120.0) -> Service:
        """Start one more worker or dispatcher and wait until it joined its consumer group and
        every member of the group logged its new assignment (the rebalance is done)."""
        before = {s.name: self.assignments(s) for s in self.active(role)}
        svc = self._service(role)
        svc.start()
        self.services.append(svc)
        self.membership.append((time.time(), role, f"+{svc.name}"))
        self.timeline.say(
            f"started {svc.name}: {len(self.active(role))} {role}(s), {self.feeder.sent} events fed"
        )
        if self.wait_rebalanced(role, before, timeout_s):
            self.timeline.say(f"{role} group rebalanced with {svc.name}")
        return svc

    def retire(self, svc: Service, timeout_s: float = 120.0) -> None:
        """SIGTERM a service for good (it leaves its group, not restarted) and wait until the
        other members logged their new assignment."""
        before = {s.name: self.assignments(s) for s in self.active(svc.role) if s is not svc}
        t = time.time()
        code = svc.stop(timeout_s=60)
        self.membership.append((t, svc.role, f"-{svc.name}"))
        self.timeline.say(
            f"stopped {svc.name} (SIGTERM, exit {code}, {time.time() - t:.1f}s): "
            f"{len(self.active(svc.role))} {svc.role}(s), {self.feeder.sent} events fed"
        )
        if self.wait_rebalanced(svc.role, before, timeout_s):
            self.timeline.say(f"{svc.role} group rebalanced without {svc.name}")

    def start_pulse(self) -> None:
        """Start timing the groups' output (:class:`Pulse`); the worker's changelog topic must
        exist, so after :meth:`wait_worker_progress`."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.settings.kafka_common(), "log_level": 2})
        names = admin.list_topics(timeout=10).topics
        changelogs = [n for n in names if n.endswith("user_state-changelog")]
        s = self.settings
        self.pulse = Pulse(
            s, {"worker": [*changelogs, s.topic_decisions], "dispatcher": [s.topic_outcomes]}
        )
        self.pulse.start()

    def rebalance_pauses(self, window_s: float = 60.0) -> list[tuple[str, float]]:
        """Per membership change (:meth:`add`, :meth:`retire`): the longest gap in its group's
        output (:meth:`Pulse.longest_gap`) from the change until the next change or
        ``window_s`` later, in seconds. A change after which the group ran out of input is
        named with ``(idle)``: its gap measures the input, not the rebalance."""
        assert self.pulse is not None
        out = []
        for i, (t, role, what) in enumerate(self.membership):
            end = min([t + window_s] + [u for u, _r, _w in self.membership[i + 1 :] if u > t])
            name = f"{what} (idle)" if i in self.idle_after else what
            out.append((name, self.pulse.longest_gap(role, t, end)))
        return out

    def wait_output(
        self, role: str, min_s: float, records: int = 20, timeout_s: float = 180.0
    ) -> None:
        """Until ``min_s`` from now have passed and ``role``'s group has written ``records``
        records since now (or has read everything fed so far): after :meth:`add` /
        :meth:`retire`, the group works again before the next change."""
        assert self.pulse is not None
        start = time.time()
        deadline = start + timeout_s
        while True:
            self.check_threads()
            now = time.time()
            if now - start >= min_s and self.pulse.written(role, start) >= records:
                return
            if now - start >= min_s and self.feeder.sent >= self.feeder.limit and self.idle(role):
                self.timeline.say(f"the {role}s have nothing left to do")
                self.idle_after.add(len(self.membership) - 1)
                return
            if now > deadline:
                raise TimeoutError(f"the {role}s wrote under {records} records in {timeout_s:g}s")
            time.sleep(0.5)

    def idle(self, role: str) -> bool:
        """Whether ``role``'s group has read everything (its lag is 0)."""
        worker_lag, dispatcher_lag = self.lags()
        return (worker_lag if role == "worker" else dispatcher_lag) == 0

    def fail_redis_master(self, key: str) -> float:
        """SIGKILL the Redis Cluster master serving ``key``; wait until its replica serves the
        slot and the cluster is healthy. Returns the seconds from the kill to the takeover."""
        assert self.cluster is not None
        victim = self.cluster.master_of(key)
        t0 = time.monotonic()
        self.cluster.kill(victim)
        self.timeline.say(f"redis master :{victim.port} (serves {key}) SIGKILLed")
        deadline = t0 + 60
        while True:
            self.check_threads()
            with contextlib.suppress(Exception):
                if self.cluster.master_of(key) is not victim:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("no replica took over the killed master's slots")
            time.sleep(0.1)
        took = time.monotonic() - t0
        self.cluster.wait_healthy()
        self.redis_failovers.append(took)
        new = self.cluster.master_of(key)
        self.timeline.say(f"its replica :{new.port} took over after {took:.1f}s; cluster ok")
        return took

    def kill(self, svc: Service | None = None, restart_after_s: float = 0.0) -> Service:
        """SIGKILL a service (random when None) and start it again, at once or after a pause."""
        svc = svc or self.rng.choice(self.active())
        self.supervisor.kill_and_restart(svc, restart_after_s)
        self.kills += 1
        when = f"restarting in {restart_after_s:g}s" if restart_after_s > 0 else "restarted"
        self.timeline.say(f"kill #{self.kills}: SIGKILL {svc.name}, {when}")
        return svc

    def restart_redis(self, down_s: float) -> None:
        """SIGKILL redis-server and start it again after ``down_s``, once every dispatcher is
        past its start-up: one that starts while Redis is down exits (docs/chaos.md, findings);
        a running one must wait for Redis without exiting and without a gateway call."""
        assert self.redis is not None
        self.wait_ready(timeout_s=90.0)
        t0 = time.monotonic()
        self.redis.kill()
        self.timeline.say(f"redis-server SIGKILLed; down for {down_s:g}s")
        time.sleep(down_s)
        self.redis.start()
        self.redis_down.append((t0, time.monotonic()))
        self.redis_restarts += 1
        self.timeline.say(f"redis-server back after {time.monotonic() - t0:.1f}s (AOF reloaded)")

    def broker_outage(self, seconds: float) -> None:
        assert self.broker is not None
        self.broker.cut()
        self.timeline.say("broker unreachable: every connection cut, new ones blackholed")
        time.sleep(seconds)
        self.broker.restore()
        self.broker_outages += 1
        self.timeline.say(f"broker reachable again after {seconds:g}s")

    def broker_freeze(self, seconds: float) -> None:
        """SIGSTOP the broker's JVM for ``seconds`` (a long GC pause or a stalled VM), SIGCONT."""
        assert self.broker is not None
        self.broker.kafka.freeze()
        self.timeline.say(f"broker JVM frozen (SIGSTOP) for {seconds:g}s")
        time.sleep(seconds)
        self.broker.kafka.thaw()
        self.broker_freezes += 1
        self.timeline.say("broker JVM thawed (SIGCONT)")

    def broker_crash(self, down_s: float) -> None:
        """SIGKILL the broker's JVM, keep it down ``down_s``, restart it on the same log dir."""
        assert self.broker is not None
        t0 = time.monotonic()
        self.broker.kill()
        self.timeline.say(f"broker JVM SIGKILLed; down for {down_s:g}s")
        time.sleep(down_s)
        self.broker.restart()
        self.broker_crashes += 1
        self.timeline.say(
            f"broker restarted on its log directory after {time.monotonic() - t0:.1f}s"
        )

    def gateway_faults(self, requests: int, wait_s: float = 0.0, connect_s: float = 0.0) -> None:
        """The next ``requests`` gateway requests get the fault mix (:data:`FAULT_MIX`); with
        ``connect_s``, first connections are refused for that long (open ones cut), then every new
        connection is reset in the TLS handshake for as long: requests that never reach the
        gateway, always retryable. Waits up to ``wait_s`` for the window's requests to arrive."""
        assert self.fake is not None
        start = len(self.fake.requests)
        self.fake.script(fault_script(requests, self.seed))
        self.fault_windows.append((start, start + requests))
        self.timeline.say(f"gateway fault window: the next {requests} requests")
        if connect_s > 0:
            # Refusing first also cuts every open keep-alive connection, so each request of the
            # handshake phase that follows needs a new connection: the faults hit every request.
            with self.fake.refusing():
                time.sleep(connect_s)
            self.fake.connection_fault = "reset_handshake"
            time.sleep(connect_s)
            self.fake.connection_fault = None
            self.connect_fault_s += 2 * connect_s
            self.timeline.say(
                f"gateway connections refused for {connect_s:g}s, "
                f"then reset in the TLS handshake for {connect_s:g}s"
            )
        deadline = time.monotonic() + wait_s
        while len(self.fake.requests) < start + requests and time.monotonic() < deadline:
            self.check_threads()
            time.sleep(0.2)
        if wait_s:
            done = min(requests, len(self.fake.requests) - start)
            self.timeline.say(f"gateway fault window: {done} of {requests} requests so far")

    def wait_worker_progress(self, timeout_s: float = 60.0) -> None:
        """Until the worker group has committed offsets: the workers are processing."""
        deadline = time.monotonic() + timeout_s
        tps = [
            TopicPartition(self.settings.topic_clickstream, p)
            for p in range(self.settings.partitions)
        ]
        consumer = Consumer(
            {**self.settings.kafka_common(), "group.id": offsets_group(self.settings.worker_id),
             "log_level": 2, "enable.auto.commit": False}
        )  # fmt: skip
        try:
            while True:
                self.check_threads()
                with contextlib.suppress(KafkaException):
                    if any(tp.offset > 0 for tp in consumer.committed(tps, timeout=5)):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers committed nothing")
                time.sleep(0.3)
        finally:
            consumer.close()

    # ------------------------------------------------------------------ progress

    def group_lag(self, group: str, topic: str) -> int | None:
        """Uncommitted records of ``group`` on ``topic`` (None while the broker is unreachable)."""
        consumer = Consumer(
            {**self.settings.kafka_common(), "group.id": group, "log_level": 2,
             "enable.auto.commit": False}
        )  # fmt: skip
        try:
            tps = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
            committed = consumer.committed(tps, timeout=5)
            lag = 0
            for tp in committed:
                low, high = consumer.get_watermark_offsets(tp, timeout=5)
                lag += high - (tp.offset if tp.offset >= 0 else low)
            return lag
        except KafkaException:
            return None
        finally:
            consumer.close()

    def lags(self) -> tuple[int | None, int | None]:
        s = self.settings
        return (
            self.group_lag(offsets_group(s.worker_id), s.topic_clickstream),
            self.group_lag(s.dispatcher_group, s.topic_decisions),
        )

    def wait_caught_up(self, timeout_s: float, settle_s: float = 8.0) -> None:
        """Until everything fed is processed: both groups at lag 0, all processes up ≥ settle_s."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        last_say = 0.0
        while streak < 3:
            self.check_threads()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pipeline did not catch up; lags {self.lags()}")
            settled = all(
                s.alive() and time.monotonic() - s.started_at > settle_s for s in self.active()
            )
            lags = self.lags()
            if settled and lags == (0, 0) and self.feeder.sent >= self.feeder.limit:
                streak += 1
            else:
                streak = 0
            if time.monotonic() - last_say > 15:
                last_say = time.monotonic()
                self.timeline.say(f"catching up: lags worker/dispatcher {lags}")
            time.sleep(1.0)

    def assigned(self, svc: Service) -> bool:
        """A dispatcher logged an assignment since its last start."""
        tail = svc.log.read_text(errors="replace").rsplit("===== start", 1)[-1]
        return "assigned partitions [" in tail

    def wait_stable(self, timeout_s: float, settle_s: float = 5.0, max_lag: int = 5_000) -> None:
        """Until every process has run ``settle_s``, every dispatcher owns partitions and both
        groups are consuming (lag below ``max_lag``): the next fault hits a running pipeline."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        last_say = time.monotonic()
        while True:
            self.check_threads()
            lags = self.lags()
            if time.monotonic() - last_say > 15:
                last_say = time.monotonic()
                self.timeline.say(f"settling: lags worker/dispatcher {lags}")
            ok = (
                all(s.alive() and time.monotonic() - s.started_at > settle_s for s in self.active())
                and all(self.assigned(s) for s in self.active("dispatcher"))
                and None not in lags
                and max(x or 0 for x in lags) < max_lag
            )
            streak = streak + 1 if ok else 0
            if streak >= 3:  # three checks in a row, a second apart
                self.timeline.say(f"stable: lags worker/dispatcher {lags}")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pipeline did not settle; lags {lags}")
            time.sleep(1.0)

    def end_of_input(self, timeout_s: float) -> None:
        """Flush markers after the last event; then until the dispatchers mark every partition
        complete and every decision has a final outcome."""
        producer = Producer({**self.settings.kafka_common(), "log_level": 2})
        send_flush(producer, self.settings.topic_clickstream)
        self.timeline.say("end of input marked on every clickstream partition")
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_threads()
            with self.observer.lock:
                flushed = self.observer.outcome_flushes.all_complete()
            live = self.observer.live_decisions()
            finals = self.observer.final_outcomes()
            if flushed and set(live) <= set(finals):
                break
            if time.monotonic() > deadline:
                self.timeline.say(
                    f"gave up waiting: outcome markers complete={flushed}, "
                    f"{len(set(live) - set(finals))} decisions without an outcome"
                )
                break
            time.sleep(0.5)
        self.timeline.say("every partition complete")

    # ------------------------------------------------------------------ the verdict

    def stop(self) -> None:
        for thread in (getattr(self, "feeder", None), getattr(self, "rss", None), self.pulse):
            if thread is not None:
                thread.halt()
        if hasattr(self, "supervisor"):
            self.supervisor.halt()
        for svc in self.services:
            code = svc.stop()
            if code not in (0, None, -signal.SIGKILL):
                self.timeline.say(f"{svc.name} exited with {code} at shutdown")
        if hasattr(self, "observer"):
            time.sleep(0.5)
            self.observer.halt()
            self.observer.join(10)
        if self.pulse is not None:
            self.pulse.join(10)
        if self.fake is not None:
            self.fake.stop()
        if hasattr(self, "stall_watch"):
            self.stall_watch.halt()
        if self.redis is not None:
            self.redis.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.broker is not None:
            self.broker.stop()

    def verdict(self, failure: Exception | None) -> Report:
        """The report, after :meth:`stop`. A run that did not complete (a stall, a crashed
        helper thread) still gets its details and summary line, the failure its first problem."""
        if failure is not None and not hasattr(self, "observer"):
            raise failure  # it never got going: nothing to report
        report = self.report()
        if failure is not None:
            report.problems.insert(0, f"the run did not complete: {failure!r}")
        return report

    def report(self) -> Report:
        assert self.fake is not None
        r = Report(
            kills=self.kills,
            redis_restarts=self.redis_restarts,
            broker_outages=self.broker_outages,
            broker_crashes=self.broker_crashes,
            broker_freezes=self.broker_freezes,
            events=len(self.events),
        )
        r.seconds = time.monotonic() - self.started
        expected = {
            (d.decision_id, d.campaign_id, d.user_id, d.fire_at)
            for d in run_backtest(self.events, load_campaigns(self.campaigns)).decisions
        }
        live_map = self.observer.live_decisions()
        live = {(d.decision_id, d.campaign_id, d.user_id, d.fire_at) for d in live_map.values()}
        r.expected_decisions, r.decisions = len(expected), len(live)
        r.missing_decisions = len(expected - live)
        r.extra_decisions = len(live - expected)
        finals = self.observer.final_outcomes()
        no_outcome = [k for k in live_map if k not in finals]
        r.without_outcome = len(no_outcome)
        r.lost = r.missing_decisions + r.without_outcome

        requests = self.fake.requests
        r.gateway_requests = len(requests)
        took = Counter(q.fields.get("client-ref", "") for q in requests if accepted(q.reply))
        asked = Counter(q.fields.get("client-ref", "") for q in requests)
        r.texts_accepted = sum(took.values())
        r.duplicates = sum(n - 1 for n in took.values() if n > 1)
        r.gateway_faults = sum(1 for a, b in self.fault_windows for q in requests[a:b]
                               if faulty(q.reply))  # fmt: skip
        r.gateway_faults += self.fake.handshake_resets
        stamps = [q.monotonic for q in requests]
        stalls = list(self.stall_watch.stalls)
        skip = unmeasured(stamps, stalls)
        r.max_requests_1s = max_in_window([t for i, t in enumerate(stamps) if i not in skip])
        r.rate_unmeasured, r.harness_stalls = len(skip), len(stalls)
        for t0, t1 in self.redis_down:
            r.calls_while_redis_down += sum(
                1 for q in requests if t0 + FAIL_CLOSED_GRACE_S < q.monotonic < t1
            )
        # At most one text per decision also means: once a request's answer was lost (the
        # gateway may have taken it), no further request for that decision, taken or not.
        per_ref: dict[str, list[Reply]] = {}
        for q in requests:
            per_ref.setdefault(q.fields.get("client-ref", ""), []).append(q.reply)
        for replies in per_ref.values():
            lost_at = next((i for i, reply in enumerate(replies) if ambiguous(reply)), None)
            if lost_at is not None:
                r.resent_after_ambiguous += len(replies) - lost_at - 1
        r.connect_fault_s = self.connect_fault_s
        r.handshake_resets = self.fake.handshake_resets

        final: dict[str, dict[str, Any]] = {}
        for did, outs in finals.items():
            kinds = {(o["status"], o["reason"]) for o in outs}
            if len(kinds) > 1:
                r.conflicting_outcomes += 1
            r.repeated_outcomes += len(outs) - 1
            final[did] = outs[-1]
        for did in live_map:
            o = final.get(did)
            if o is None:
                continue
            r.statuses[o["status"] if o["status"] != "failed" else f"failed:{o['reason']}"] += 1
            if o["status"] == "failed" and o["reason"].startswith(UNKNOWN_PREFIX):
                # An outcome, not a loss: the text went out at most once, maybe not at all.
                r.unknown += 1
                r.unknown_taken += int(took[did] > 0)
                last = per_ref.get(did, [])[-1:]
                if o["reason"] != UNKNOWN_AFTER_CRASH and not (last and ambiguous(last[0])):
                    r.unknown_unprovoked += 1  # a real timeout (a loaded machine) or a race
            elif took[did] and o["status"] != "sent":
                r.misreported += 1
            elif o["status"] == "sent" and not took[did]:
                r.misreported += 1
        zones = {str(c["user_id"]): str(c["timezone"]) for c in self.contacts}
        texts = [
            (live_map[did].user_id, live_map[did].campaign_id, int(final[did]["at"]))
            for did in live_map
            if did in final and final[did]["status"] == "sent"
        ]
        r.in_quiet_hours, r.over_cap = policy_breaches(load_campaigns(self.campaigns), zones, texts)
        with self.observer.lock:
            dlq = list(self.observer.dlq)
        r.dlq = len({d for d, _reason in dlq})
        dlq_reasons = {d: reason for d, reason in dlq}
        # What must be on sms-dlq: every decision the gateway failed, permanently or after its
        # retries (the fake saw it, or its connections failed before a request could leave);
        # not the ambiguous ones (not known to have failed), nor policy failures.
        gateway_failed = {
            did: o["reason"]
            for did, o in final.items()
            if o["status"] == "failed"
            and not o["reason"].startswith(UNKNOWN_PREFIX)
            and (asked[did] or o["reason"] in CONNECT_REASONS)
        }
        r.dlq_missing = sum(1 for d, why in gateway_failed.items() if dlq_reasons.get(d) != why)
        r.dlq_unexpected = sum(1 for d in dlq_reasons if d not in gateway_failed)
        r.crash_restarts = len(self.supervisor.crashes)
        t_base = self.timeline.t0
        for t, name, _code in self.supervisor.crashes:
            r.exits_without_redis += int(
                name.startswith("dispatcher")
                and any(t0 - t_base <= t <= t1 - t_base + REDIS_BACK_GRACE_S
                        for t0, t1 in self.redis_down)
            )  # fmt: skip
        for role in ("worker", "dispatcher"):
            for phase in ("steady", "burst"):
                peak = self.rss.peak(role, [phase])
                if peak:
                    r.rss[f"{role}_{phase}"] = peak

        def problem(cond: bool, text: str) -> None:
            if cond:
                r.problems.append(text)

        failures = len(self.feeder.failures)
        problem(
            failures > 0, f"{failures} events not delivered by the feeder (not a pipeline fault)"
        )
        problem(r.missing_decisions > 0, f"{r.missing_decisions} backtest decisions never made")
        problem(r.extra_decisions > 0, f"{r.extra_decisions} decisions the backtest did not make")
        problem(r.without_outcome > 0, f"{r.without_outcome} decisions without a final outcome")
        problem(r.duplicates > 0, f"{r.duplicates} texts accepted twice for one decision")
        problem(r.misreported > 0, f"{r.misreported} outcomes disagree with the gateway")
        problem(r.conflicting_outcomes > 0, f"{r.conflicting_outcomes} decisions with two outcomes")
        problem(r.max_requests_1s > RATE_PER_S, f"{r.max_requests_1s} requests in one second")
        problem(r.calls_while_redis_down > 0, f"{r.calls_while_redis_down} calls without Redis")
        problem(
            r.exits_without_redis > 0,
            f"{r.exits_without_redis} dispatcher exits during a Redis outage (it should wait)",
        )
        problem(
            r.resent_after_ambiguous > 0,
            f"{r.resent_after_ambiguous} requests resent after an answer was lost",
        )
        problem(r.dlq_missing > 0, f"{r.dlq_missing} gateway failures missing from sms-dlq")
        problem(r.in_quiet_hours > 0, f"{r.in_quiet_hours} texts sent inside quiet hours")
        problem(r.over_cap > 0, f"{r.over_cap} texts sent past a frequency cap")
        problem(r.dlq_unexpected > 0, f"{r.dlq_unexpected} sms-dlq records without a failure")
        if no_outcome or expected - live or live - expected:
            sample = {
                "missing": sorted(expected - live)[:5],
                "extra": sorted(live - expected)[:5],
                "no_outcome": sorted(no_outcome)[:5],
            }
            self.timeline.say(f"samples: {sample}")
        (self.workdir / "requests.jsonl").write_text(
            "".join(
                json.dumps({"ref": q.fields.get("client-ref"), "t": q.monotonic,
                            "reply": q.reply.kind, "delay": q.reply.delay_s,
                            "lose": q.reply.lose,
                            "status": q.reply.status or q.reply.http_status})
                + "\n"
                for q in requests
            )
        )  # fmt: skip
        return r


def write_summary(report: Report, timeline: Timeline) -> None:
    """Print the details and, last, the summary line; also into $NUDGEFLOW_CHAOS_SUMMARY."""
    for line in report.details().splitlines():
        timeline.say(line)
    for p in report.problems:
        timeline.say(f"PROBLEM: {p}")
    line = report.line
    if report.problems:  # lost=0 duplicates=0 alone must never read as a pass
        line += f" FAILED: {len(report.problems)} invariant(s) broken, see PROBLEM above"
    print(line, flush=True)
    target = os.environ.get("NUDGEFLOW_CHAOS_SUMMARY")
    if target:
        with open(target, "a") as fh:
            fh.write(report.details() + "\n" + line + "\n")


def phases(chaos: Chaos, plan: Sequence[tuple[str, Callable[[], None]]]) -> None:
    for name, step in plan:
        chaos.rss.phase = name
        step()
        chaos.check_threads()
