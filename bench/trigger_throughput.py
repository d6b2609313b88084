"""Trigger-stage throughput: the Faust worker against a raw confluent-kafka consume + Avro decode.

Issue 7's target is a *ratio* measured in one run, so that the machine, the broker and the data
cancel out: both figures read the same clickstream topic on the same fresh embedded stack.

1. A synthetic clickstream (``processors.simulate.generate``) is encoded as Avro in the wire
   format and produced keyed by ``user_id``, as fast as the producer goes.
2. Baseline: one confluent-kafka ``Consumer`` assigned to every partition from the beginning,
   ``consume(1000)`` + ``Codec.decode`` of each message until all are seen.
3. Trigger stage: a real ``nudgeflow worker`` subprocess (event clock, every example campaign,
   changelog on) consumes the same topic in a new group. Its rate comes from its own
   ``nudgeflow_events_consumed_total`` (``/metrics``) and CPU time, sampled every 0.5 s from
   the first sample where it had consumed records to the last before it had consumed them all:
   start-up, the group join and the first batch are left out. It is done when its committed
   offsets reach the end (the fallback if the metrics do not answer: they lag the work by up to
   a checkpoint interval).

4. Peers (``bench/peers``): the cart-abandonment and product-view triggers written with
   quixstreams and with a Faust agent and tables, each over the same topic in a new group
   (its first ``PEER_EVENTS``); their own events/s from their first event to the last.
   ``peer_ratio`` = the worker's rate over the faster peer's.

Prints ``key=value`` lines (``raw_events_per_s``, ``faust_events_per_s``, ...) and ``ratio=…``
last. Everything started here (broker, Redis, worker) is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from processors.devstack import EmbeddedStack, StackError, create_topics
from processors.settings import REPO_ROOT, Settings
from schemas.codec import Codec
from streams.reader import offsets_group
from streams.state.checkpoint import is_position_key

SAMPLE_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 30.0
CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"
# Settings the worker must share with this process, besides every ``topic_*`` (the rest keep
# their dev defaults): NUDGEFLOW_* of the caller's environment do not reach the worker.
SHARED_FIELDS = (
    "profile",
    "state_dir",
    "bootstrap_servers",
    "schema_registry_url",
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "partitions",
    "clock",
    "campaigns_file",
    "worker_id",
    "worker_web_port",
)


class BenchError(RuntimeError):
    """The benchmark could not produce a figure; the message says which step failed and why."""


def say(text: str) -> None:
    """Progress goes to stderr so that stdout holds only the ``key=value`` figures."""
    print(f"[{Path(sys.argv[0]).stem}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- produce


def produce_clickstream(
    settings: Settings, codec: Codec, events: int, users: int, seed: int, compression: str
) -> int:
    """Generate, encode and produce the clickstream keyed by ``user_id``; returns the count."""
    try:
        from processors.simulate import generate
    except ImportError as exc:
        raise BenchError(f"processors.simulate.generate is not available: {exc}") from None

    t = time.perf_counter()
    records = [
        (ev.user_id.encode(), codec.encode("ClickEvent", ev.to_record()))
        for ev in generate(users, events, seed)
    ]
    say(f"generated and encoded {len(records)} events in {time.perf_counter() - t:.1f} s")

    producer = Producer(
        {
            **settings.kafka_common(),
            "enable.idempotence": True,  # as processors.commands.produce.make_producer
            "compression.type": compression,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failures.append(err.str())

    topic = settings.topic_clickstream
    t = time.perf_counter()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)  # local queue full: let deliveries drain
        producer.poll(0)
    remaining = producer.flush(120)
    elapsed = time.perf_counter() - t
    if remaining or failures:
        raise BenchError(
            f"{remaining + len(failures)} of {len(records)} events were not delivered: "
            f"{failures[:3]}"
        )
    say(f"produced {len(records)} events in {elapsed:.1f} s ({len(records) / elapsed:,.0f}/s)")
    return len(records)


def partitions(consumer: Consumer, topic: str) -> list[int]:
    """Partition numbers of ``topic`` (counts come from what was produced and consumed)."""
    meta = consumer.list_topics(topic, timeout=10)
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise BenchError(f"topic {topic!r} is missing on the broker")
    return sorted(info.partitions)


# --------------------------------------------------------------------------- raw baseline


def raw_consume_rate(
    settings: Settings, codec: Codec, expected: int, timeout_s: float
) -> tuple[float, float]:
    """(events/s, events per CPU-second) of ``consume(1000)`` + ``Codec.decode`` over the whole
    topic.

    The clock starts when the first batch arrives (connection set-up left out, as the Faust
    figure leaves out its join) and counts only the messages after that batch. CPU time is this
    process's (librdkafka's threads included).
    """
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        topic = settings.topic_clickstream
        parts = partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        decode = codec.decode
        seen = 0
        first_batch = 0
        started: float | None = None
        cpu_started = 0.0
        deadline = time.monotonic() + timeout_s
        while seen < expected:
            msgs = consumer.consume(1000, timeout=1.0)
            if not msgs:
                if time.monotonic() > deadline:
                    raise BenchError(f"raw consumer saw {seen} of {expected} events before timeout")
                continue
            for msg in msgs:
                if msg.error() is not None:
                    raise BenchError(f"raw consumer error: {msg.error()}")
                decode(msg.value())
            seen += len(msgs)
            if started is None:
                started = time.perf_counter()
                cpu_started = time.process_time()
                first_batch = len(msgs)
        elapsed = time.perf_counter() - (started or 0.0)
        cpu = time.process_time() - cpu_started
        counted = seen - first_batch
        if counted <= 0 or elapsed <= 0:
            raise BenchError("raw consumer got everything in one batch; use more --events")
        return counted / elapsed, (counted / cpu if cpu > 0 else 0.0)
    finally:
        consumer.close()


# --------------------------------------------------------------------------- Faust worker


class Worker:
    """A ``nudgeflow worker`` subprocess; ``stop`` is safe to call twice and after it died."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str = "worker",
    ) -> None:
        """``argv`` replaces ``nudgeflow worker`` (e.g. a bench launcher); ``env`` adds to the
        environment (``NUDGEFLOW_*`` of this process never reach the child, only ``settings``)."""
        if argv is None:
            exe = Path(sys.executable).with_name("nudgeflow")
            argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "processors.commands.cli"]
            argv = [*argv, "worker"]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGEFLOW_")}
        shared = [*SHARED_FIELDS, *(f for f in Settings.model_fields if f.startswith("topic_"))]
        child_env.update({f"NUDGEFLOW_{f.upper()}": str(getattr(settings, f)) for f in shared})
        child_env.update(env or {})
        child_env["PYTHONPATH"] = os.pathsep.join(  # a compiled build on it comes first
            p for p in (child_env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p
        )
        self.log_path = workdir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        # cwd=workdir: Faust puts its ``<app id>-data`` directory in the working directory.
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"nudgeflow worker exited with code {self.proc.returncode}; last lines of "
                f"{self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> int | None:
        """SIGTERM (the worker commits and leaves the group), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic seconds
    committed: int  # sum of committed offsets over all partitions
    cpu: float = 0.0  # the worker's user + system CPU seconds so far (all threads)
    consumed: int | None = None  # the worker's nudgeflow_events_consumed_total (None: no scrape)


def events_consumed(port: int) -> int | None:
    """Sum of ``nudgeflow_events_consumed_total`` on the worker's ``/metrics`` (None if it does
    not answer). The worker adds each batch's records as it finishes the batch, so the count is
    at most one batch (2,000 records) behind the CPU time read next to it; the committed offsets
    lag by up to a checkpoint interval and the commit thread, which made single runs move by
    +-15-25% (docs/adr/0024-event-clock-savings-and-bench-counting.md)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as answer:
            text = answer.read().decode()
    except (OSError, ValueError):
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nudgeflow_events_consumed_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``; 0.0 where unavailable).

    On a shared machine wall-clock rates move with the neighbours' load; events per CPU-second
    of the process itself move much less, so the bench reports both.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def committed_total(watcher: Consumer, tps: list[TopicPartition]) -> int:
    return sum(max(tp.offset, 0) for tp in watcher.committed(tps, timeout=5))


def steady_window(samples: list[Sample], target: int) -> tuple[Sample, Sample]:
    """Events/s between the first sample where the offsets moved and the last one.

    Faust commits every 10,000 acked messages or every 2.8 s. The commits while it is busy are
    count-triggered, but the one that reaches ``target`` comes from the timer, up to 2.8 s after
    the last event was processed; so when two busy-time samples at least 1 s apart exist, the
    window ends at the last sample before ``target`` instead.
    """
    moved = [
        cur
        for prev, cur in zip(samples, samples[1:], strict=False)
        if cur.committed > prev.committed
    ]
    if not moved:
        raise BenchError("the worker's committed offsets never moved")
    first = moved[0]
    busy = [s for s in moved if s.committed < target]
    last = busy[-1] if len(busy) >= 2 and busy[-1].t - first.t >= 1.0 else moved[-1]
    if last is first:
        raise BenchError("the worker committed everything at once; use more --events")
    return first, last


def consumed_window(samples: list[Sample], target: int) -> tuple[Sample, Sample] | None:
    """From the first sample where the worker had consumed records (its first batch is left out,
    as the raw loop's) to the last one before it had consumed ``target``; None when the scrapes
    do not give two such samples at least 1 s apart."""
    busy = [s for s in samples if s.consumed is not None and 0 < s.consumed < target]
    if len(busy) < 2 or busy[-1].t - busy[0].t < 1.0:
        return None
    return busy[0], busy[-1]


def steady_rates(samples: list[Sample], target: int) -> tuple[float, float, str]:
    """(events/s, events per CPU-second of the worker, which counter): over
    :func:`consumed_window` when the worker's metrics answered, else over
    :func:`steady_window` of the committed offsets."""
    window = consumed_window(samples, target)
    if window is not None:
        first, last = window
        events = float(cast(int, last.consumed) - cast(int, first.consumed))
        source = "consumed"
    else:
        first, last = steady_window(samples, target)
        events = float(last.committed - first.committed)
        source = "committed"
    cpu = last.cpu - first.cpu
    return events / (last.t - first.t), (events / cpu if cpu > 0 else 0.0), source


class Profiler:
    """``py-spy record`` attached to the worker (non-blocking sampling, 100 Hz, raw format)."""

    def __init__(self, out: Path, exe: str) -> None:
        found = shutil.which(exe)
        if found is None:
            raise BenchError(f"--profile needs py-spy; {exe!r} not found")
        self.exe, self.out = found, out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, worker: Worker) -> None:
        argv = [self.exe, "record", "--nonblocking", "-r", "100", "-f", "raw"]
        self.proc = subprocess.Popen(
            [*argv, "-o", str(self.out), "-p", str(worker.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def finish(self) -> None:
        """After the worker stopped: py-spy writes its file and exits; print the summary."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        from _profile import summarize  # bench/ is sys.path[0] when run as a script

        if self.out.exists():
            say(f"profile written to {self.out}:\n{summarize(self.out)}")


@dataclass(frozen=True)
class FaustRun:
    rate: float  # steady events/s
    cpu_rate: float  # steady events per CPU-second of the worker
    wall_s: float  # from spawn to everything committed
    worker: Worker
    counted_by: str = "consumed"  # the counter behind the rates (steady_rates)


def faust_rate(
    settings: Settings,
    workdir: Path,
    expected: int,
    timeout_s: float,
    on_start: Callable[[Worker], None] | None = None,
) -> FaustRun:
    """Start the worker, sample its group's committed offsets until ``expected``.

    The worker's pid is logged so that a profiler can be attached (``py-spy record -p PID``);
    ``on_start`` is called with the worker right after it is spawned (``--profile`` uses it).
    """
    watcher = Consumer(
        {
            **settings.kafka_common(),
            # Same group id, but this consumer never subscribes, so it never joins the group:
            # it only fetches the group's committed offsets.
            "group.id": offsets_group(settings.worker_id),
            "enable.auto.commit": False,
        }
    )
    worker: Worker | None = None
    try:
        topic = settings.topic_clickstream
        tps = [TopicPartition(topic, p) for p in partitions(watcher, topic)]
        metrics_port = free_port()
        worker = Worker(settings, workdir, env={"NUDGEFLOW_METRICS_PORT": str(metrics_port)})
        say(f"worker started (pid {worker.pid}), waiting for {expected} committed offsets")
        if on_start is not None:
            on_start(worker)

        def sample() -> Sample:
            consumed = events_consumed(metrics_port)  # first: at most one batch behind the CPU
            cpu = process_cpu_s(worker.pid)
            return Sample(time.monotonic(), committed_total(watcher, tps), cpu, consumed)

        samples = [sample()]
        deadline = worker.started + timeout_s
        while samples[-1].committed < expected:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the worker committed {samples[-1].committed} of {expected} events in "
                    f"{timeout_s:.0f} s; last lines of its log:\n{worker.log_tail()}"
                )
            time.sleep(max(0.0, samples[-1].t + SAMPLE_INTERVAL_S - time.monotonic()))
            samples.append(sample())
        total = samples[-1].t - worker.started
        moves = [b for a, b in zip(samples, samples[1:], strict=False) if b.committed > a.committed]
        say(
            "commits seen (s after spawn: committed): "
            + " ".join(f"{s.t - worker.started:.1f}:{s.committed}" for s in moves)
        )
        rate, cpu_rate, counted_by = steady_rates(samples, expected)
        return FaustRun(rate, cpu_rate, total, worker, counted_by)
    except BaseException:
        if worker is not None:
            worker.stop()
        raise
    finally:
        watcher.close()


def state_bytes_per_user(settings: Settings, idle_s: float = 2.0) -> tuple[float, int]:
    """Mean serialized size of the latest ``user_state`` value per key, read from the table's
    changelog topic (what a restarted worker would restore); returns (bytes/user, users).

    Call it after the worker stopped: the read ends once the topic stays quiet for ``idle_s``
    (see :func:`partitions` for why not at the high watermarks).
    """
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": f"bench-state-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        name = f"{settings.worker_id}-user_state-changelog"
        if name not in consumer.list_topics(timeout=10).topics:
            raise BenchError(f"changelog topic {name!r} not found")
        consumer.assign(
            [TopicPartition(name, p, OFFSET_BEGINNING) for p in partitions(consumer, name)]
        )
        latest: dict[bytes, int] = {}
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            msgs = consumer.consume(1000, timeout=0.5)
            if msgs:
                quiet_since = time.monotonic()
            for msg in msgs:
                if msg.error() is not None:
                    raise BenchError(f"changelog read error: {msg.error()}")
                key, value = msg.key() or b"", msg.value()
                if is_position_key(key):
                    continue  # the worker's clickstream positions, not a user's state
                if value is None:
                    latest.pop(key, None)
                else:
                    latest[key] = len(value)
        if not latest:
            raise BenchError("the state changelog is empty")
        return sum(latest.values()) / len(latest), len(latest)
    finally:
        consumer.close()


# --------------------------------------------------------------------------- peers

PEERS = ("quix", "faust")  # bench/peers/<name>_peer.py
OWN_VENV = {"quix"}  # run with the peers' virtualenv, not NudgeFlow's
# Each peer reads this many events from the start of the topic (the rate is per event; the Faust
# peer does ~1-3k/s, so the whole topic would not fit make bench's 10 minutes).
PEER_EVENTS = 40_000


@dataclass
class PeerResult:
    rate: float
    cpu_rate: float
    fired: dict[str, int]


def peer_rate(
    name: str, settings: Settings, tmp: Path, expected: int, timeout_s: float
) -> PeerResult:
    """Run ``bench/peers/<name>_peer.py`` over the whole clickstream topic in a new group; its
    own figure: events/s from its first event to the last."""
    workdir = tmp / f"peer-{name}"
    workdir.mkdir()
    script = Path(__file__).resolve().parent / "peers" / f"{name}_peer.py"
    python = sys.executable
    if name in OWN_VENV:  # bench/peers/requirements.txt, installed by make bench
        python = os.environ.get("NUDGEFLOW_BENCH_PEERS_PYTHON", "")
        if not python or not Path(python).exists():
            raise BenchError("no peers virtualenv (NUDGEFLOW_BENCH_PEERS_PYTHON); run make bench")
    argv = [
        python, str(script), "--bootstrap", settings.bootstrap_servers,
        "--registry", settings.schema_registry_url, "--topic", settings.topic_clickstream,
        "--expected", str(expected), "--group", f"bench-peer-{name}-{uuid.uuid4().hex[:8]}",
        "--state-dir", str(workdir / "state"), "--partitions", str(settings.partitions),
        "--result", str(workdir / "result.json"),
    ]  # fmt: skip
    # A peer imports its neighbour module (bench/peers/shared.py) from the script's directory,
    # which PYTHONSAFEPATH (make bench's compiled build) would keep off its path.
    peer_env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    log = workdir / "peer.log"
    with log.open("wb") as err:
        try:
            subprocess.run(
                argv, cwd=workdir, stdout=err, stderr=subprocess.STDOUT, timeout=timeout_s,
                stdin=subprocess.DEVNULL, env=peer_env,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BenchError(f"peer {name} did not finish in {timeout_s:.0f} s") from None
    result = workdir / "result.json"
    if result.exists():
        found = json.loads(result.read_text())
        fired = {k[6:]: int(v) for k, v in found.items() if k.startswith("fired_")}
        return PeerResult(found["events_per_s"], found["events_per_cpu_s"], fired)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    raise BenchError(f"peer {name} printed no figure; last lines of its log:\n" + "\n".join(tail))


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that the teardown in ``finally`` runs."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000, help="events (default 100000)")
    parser.add_argument("--users", type=int, default=100_000, help="users (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=480.0,
        help="seconds for each consume phase (default 480)",
    )
    parser.add_argument(
        "--compression",
        choices=("none", "gzip", "lz4", "snappy", "zstd"),
        default="lz4",
        help="producer compression (default lz4, as `nudgeflow produce` and `simulate` write)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy collapsed stacks of the worker (from spawn to stop) to this file and "
        "print a summary on stderr",
    )
    parser.add_argument(
        "--py-spy", default="py-spy", help="py-spy executable for --profile (default: on PATH)"
    )
    args = parser.parse_args(argv)
    if args.events < 10_000 or args.users < 1:
        parser.error("--events must be >= 10000 and --users >= 1")
    return args


def run(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str]]:
    stack = EmbeddedStack()
    state_dir = tmp / "stack"
    say(f"starting the embedded stack in {state_dir}")
    info = stack.up(state_dir)
    worker: Worker | None = None
    try:
        settings = Settings.load(
            profile="dev",
            state_dir=state_dir,
            clock="event",
            campaigns_file=CAMPAIGNS,
            worker_id=f"bench-worker-{uuid.uuid4().hex[:10]}",
            worker_web_port=free_port(),
        )
        create_topics(info.bootstrap_servers, settings)
        codec = Codec(settings.schema_registry_url)
        n = produce_clickstream(
            settings, codec, args.events, args.users, args.seed, args.compression
        )

        raw, raw_cpu = raw_consume_rate(settings, codec, n, args.timeout)
        say(f"raw consume + decode: {raw:,.0f} events/s, {raw_cpu:,.0f} per CPU-second")
        profiler = Profiler(args.profile, args.py_spy) if args.profile else None
        result = faust_rate(
            settings, tmp, n, args.timeout, on_start=profiler.start if profiler else None
        )
        worker = result.worker
        say(
            f"faust worker: {result.rate:,.0f} events/s steady ({result.cpu_rate:,.0f} per "
            f"CPU-second, counted by {result.counted_by} records), all committed "
            f"{result.wall_s:.1f} s after spawn"
        )
        worker.stop()
        if profiler is not None:
            profiler.finish()
        peers: dict[str, PeerResult] = {}
        for name in PEERS:
            try:
                peers[name] = peer_rate(name, settings, tmp, min(n, PEER_EVENTS), args.timeout)
            except BenchError as exc:
                say(f"peer {name} skipped: {exc}")
                continue
            say(
                f"peer {name}: {peers[name].rate:,.0f} events/s ({peers[name].cpu_rate:,.0f} per "
                f"CPU-second), fired {peers[name].fired}"
            )
        cpu_ratio = result.cpu_rate / raw_cpu if raw_cpu > 0 else 0.0
        lines = [
            ("events", str(n)),
            ("users", str(args.users)),
            ("raw_events_per_s", f"{raw:.0f}"),
            ("faust_events_per_s", f"{result.rate:.0f}"),
            ("faust_wall_s", f"{result.wall_s:.1f}"),
            ("raw_events_per_cpu_s", f"{raw_cpu:.0f}"),
            ("faust_events_per_cpu_s", f"{result.cpu_rate:.0f}"),
            ("cpu_ratio", f"{cpu_ratio:.3f}"),
            ("faust_counted_by", result.counted_by),
        ]
        for name, peer in peers.items():
            lines += [
                (f"peer_{name}_events_per_s", f"{peer.rate:.0f}"),
                (f"peer_{name}_events_per_cpu_s", f"{peer.cpu_rate:.0f}"),
                (f"peer_{name}_ratio", f"{result.rate / peer.rate:.2f}"),
            ]
        if peers:
            fastest = max(peers.values(), key=lambda p: p.rate)
            lines.append(("peer_ratio", f"{result.rate / fastest.rate:.2f}"))
            if fastest.cpu_rate > 0:
                lines.append(("peer_cpu_ratio", f"{result.cpu_rate / fastest.cpu_rate:.2f}"))
        try:
            per_user, users = state_bytes_per_user(settings)
            lines += [("state_users", str(users)), ("state_bytes_per_user", f"{per_user:.0f}")]
        except BenchError as exc:
            say(f"state_bytes_per_user skipped: {exc}")
        lines.append(("ratio", f"{result.rate / raw:.3f}"))
        return lines
    finally:
        if worker is not None:
            worker.stop()
        stack.down(state_dir)


def run_main(
    name: str,
    run_fn: Callable[[argparse.Namespace, Path], list[tuple[str, str]]],
    args: argparse.Namespace,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """What every benchmark's ``main`` does around its ``run``: a temporary directory, SIGTERM
    as Ctrl-C (so everything started is stopped), a one-line error instead of a traceback for
    ``BenchError``/``StackError`` (and ``errors``), and the ``key=value`` figures on stdout."""
    tmp = Path(tempfile.mkdtemp(prefix="nudgeflow-bench-"))
    try:
        with sigterm_as_interrupt():
            lines = run_fn(args, tmp)
    except (BenchError, StackError) + errors as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key, value in lines:
        print(f"{key}={value}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    # ValueError: simulate's arguments
    return run_main("trigger_throughput", run, parse_args(argv), (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
