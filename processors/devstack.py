"""Embedded dev stack: an Apache Kafka broker and a redis-server on free loopback ports.

The broker is a single-node KRaft Kafka (``processors.kafka_broker``) whose log directory lives
in the state dir and is wiped when a new stack starts. Both run as child processes in their own
session (so a Ctrl-C in the terminal that started them does not kill them) and write their
addresses to ``<state_dir>/stack.json``, which the ``dev`` settings profile reads. ``down`` only
ever signals the pids recorded there, and only after checking that each pid still runs the
executable we started (pids get recycled).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from processors import kafka_broker
from processors.settings import Settings

log = logging.getLogger("nudgeflow.devstack")

STATE_FILE = "stack.json"
BROKER_LOG = "kafka.log"
BROKER_DIR = "kafka"
REDIS_LOG = "redis.log"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
REDIS_INSTALL_HINT = "sudo apt-get install -y redis-server"


class StackError(RuntimeError):
    """The embedded stack could not be started, stopped or used; the message says why."""


@dataclass(frozen=True)
class StackInfo:
    """Where the embedded stack listens and whether it answers."""

    bootstrap_servers: str
    redis_url: str
    broker_pid: int
    redis_pid: int
    started_at: float
    state_dir: Path
    broker_healthy: bool = True
    redis_healthy: bool = True
    reused: bool = False  # True when ``up`` found an already running, healthy stack
    broker_bin: str = ""
    redis_bin: str = ""
    broker_start: int | None = None  # /proc start time (clock ticks) to detect recycled pids
    redis_start: int | None = None
    broker_version: str = ""  # e.g. "Apache Kafka 4.4.0"

    @property
    def healthy(self) -> bool:
        return self.broker_healthy and self.redis_healthy

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "redis_url": self.redis_url,
            "broker_pid": self.broker_pid,
            "redis_pid": self.redis_pid,
            "started_at": self.started_at,
            "broker_bin": self.broker_bin,
            "redis_bin": self.redis_bin,
            "broker_start": self.broker_start,
            "redis_start": self.redis_start,
            "broker_version": self.broker_version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], state_dir: Path) -> StackInfo:
        return cls(
            bootstrap_servers=str(data["bootstrap_servers"]),
            redis_url=str(data["redis_url"]),
            broker_pid=int(data["broker_pid"]),
            redis_pid=int(data["redis_pid"]),
            started_at=float(data["started_at"]),
            state_dir=state_dir,
            broker_bin=str(data.get("broker_bin", "")),
            redis_bin=str(data.get("redis_bin", "")),
            broker_start=data.get("broker_start"),
            redis_start=data.get("redis_start"),
            broker_version=str(data.get("broker_version", "")),
        )


# --------------------------------------------------------------------------- binaries


def kafka_node(state_dir: Path, port: int, controller_port: int) -> kafka_broker.KafkaNode:
    """The embedded broker's node (jars fetched with Maven first if needed)."""
    try:
        return kafka_broker.KafkaNode(
            home=state_dir / BROKER_DIR,
            port=port,
            controller_port=controller_port,
            libs=kafka_broker.ensure_libs(),
            java=kafka_broker.java_binary(),
        )
    except kafka_broker.KafkaSetupError as exc:
        raise StackError(str(exc)) from exc


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise StackError(f"redis-server is not on PATH; install it with: {REDIS_INSTALL_HINT}")
    return found


# --------------------------------------------------------------------------- process helpers


def _free_ports(n: int) -> list[int]:
    """Ask the kernel for ``n`` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses; everything after the last ')' is safe.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _owns(pid: int, binary: str, start: int | None) -> bool:
    """True if ``pid`` is alive and still runs ``binary`` (and started when we recorded)."""
    if pid <= 0 or not _alive(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        if start is not None and _proc_start_time(pid) != start:
            return False
        try:
            exe = os.readlink(proc / "exe").removesuffix(" (deleted)")
        except OSError:
            return False
        return not binary or exe == os.path.realpath(binary)
    # No /proc (macOS): fall back to ps and compare the command name.
    out = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return bool(out.strip()) and (not binary or Path(binary).name in out)


def _stop(pid: int, binary: str, start: int | None, proc: subprocess.Popen[bytes] | None) -> bool:
    """SIGTERM, wait, SIGKILL ``pid`` if it is still ours. True if it was running.

    With a ``Popen`` handle the pid is ours for sure (an unreaped child's pid cannot be reused);
    without one (another ``nudgeflow`` process started it) the pid must pass ``_owns``.
    """
    if proc is not None:
        if proc.poll() is not None:
            return False
    elif not _owns(pid, binary, start):
        return False
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
            if not _alive(pid):
                return True
            time.sleep(0.05)
    raise StackError(f"process {pid} ({Path(binary).name}) did not exit after SIGKILL")


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# --------------------------------------------------------------------------- health checks


def _tcp_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker_healthy(
    bootstrap: str, timeout: float = 3.0, conf: dict[str, Any] | None = None
) -> bool:
    """True if the broker answers a metadata request (``conf``: e.g. security settings)."""
    host, _, port = bootstrap.rpartition(":")
    if not _tcp_open(host, int(port)):  # avoids librdkafka connect-refused noise on stderr
        return False
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({**(conf or {}), "bootstrap.servers": bootstrap})
        md = admin.list_topics(timeout=timeout)
    except Exception:  # KafkaException on timeout; anything else also means "not healthy"
        return False
    return bool(md.brokers)


def _warm_up(bootstrap: str) -> None:
    """Load the transaction coordinator now (~1 s): the first idempotent producer would otherwise
    find it loading and print a retry warning."""
    from confluent_kafka import KafkaException, Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": "nudgeflow-warm-up", "log_level": 0}
    )
    with contextlib.suppress(KafkaException):
        producer.init_transactions(30)


def redis_healthy(url: str, timeout: float = 1.0) -> bool:
    """True if Redis answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------- the stack


def _exe_of(pid: int, fallback: str) -> str:
    """The file the kernel runs for ``pid``, symlinks resolved (redis-server -> redis-check-rdb)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return os.path.realpath(fallback)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    exe: str
    log_path: Path


@dataclass
class EmbeddedStack:
    """Starts/stops the embedded broker + Redis recorded in a state dir.

    Keeps the ``Popen`` handles of processes it started itself so that stopping them from the
    same Python process also reaps them (no zombies in long test sessions).
    """

    ready_timeout_s: float = READY_TIMEOUT_S
    _children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # ---- public API

    def up(self, state_dir: Path) -> StackInfo:
        """Start the stack (or reuse a healthy one) and return its addresses."""
        state_dir = Path(state_dir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        redis_bin = redis_binary()
        with self._locked(state_dir):
            current = self.status(state_dir)
            if current is not None and current.healthy:
                return replace(current, reused=True)
            if current is not None:
                log.warning("stale or unhealthy stack in %s; restarting it", state_dir)
                self._down_unlocked(state_dir)
            return self._start(state_dir, redis_bin)

    def down(self, state_dir: Path) -> bool:
        """Stop the processes recorded in ``stack.json``; True if a stack was recorded."""
        state_dir = Path(state_dir).resolve()
        if not (state_dir / STATE_FILE).exists():
            return False
        with self._locked(state_dir):
            return self._down_unlocked(state_dir)

    def status(self, state_dir: Path) -> StackInfo | None:
        """Recorded addresses plus live health, or None if no stack is recorded."""
        state_dir = Path(state_dir).resolve()
        info = _read_state(state_dir)
        if info is None:
            return None
        broker_ok = _owns(info.broker_pid, info.broker_bin, info.broker_start) and broker_healthy(
            info.bootstrap_servers
        )
        redis_ok = _owns(info.redis_pid, info.redis_bin, info.redis_start) and redis_healthy(
            info.redis_url
        )
        return replace(info, broker_healthy=broker_ok, redis_healthy=redis_ok)

    # ---- internals

    @contextlib.contextmanager
    def _locked(self, state_dir: Path) -> Iterator[None]:
        """Serialise up/down on one state dir across processes (two ``make test`` at once)."""
        with open(state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _down_unlocked(self, state_dir: Path) -> bool:
        info = _read_state(state_dir)
        state_file = state_dir / STATE_FILE
        if info is None:
            state_file.unlink(missing_ok=True)
            return False
        for pid, binary, start in (
            (info.broker_pid, info.broker_bin, info.broker_start),
            (info.redis_pid, info.redis_bin, info.redis_start),
        ):
            proc = self._children.pop(pid, None)
            if _stop(pid, binary, start, proc):
                log.info("stopped %s (pid %d)", Path(binary).name, pid)
        state_file.unlink(missing_ok=True)
        return True

    def _spawn(self, name: str, argv: list[str], log_path: Path) -> _Child:
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[proc.pid] = proc
        # Popen returns after exec succeeded, so /proc/PID/exe already names the real program.
        return _Child(name, proc, _exe_of(proc.pid, argv[0]), log_path)

    def _start(self, state_dir: Path, redis_bin: str) -> StackInfo:
        # A free port can be taken by someone else between our probe and the bind; retry then.
        last_error = ""
        for _attempt in range(3):
            broker_port, controller_port, redis_port = _free_ports(3)
            node = kafka_node(state_dir, broker_port, controller_port)
            shutil.rmtree(node.home, ignore_errors=True)  # a new stack starts empty
            try:
                node.prepare()
            except kafka_broker.KafkaSetupError as exc:
                raise StackError(str(exc)) from exc
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            redis_argv = [redis_bin, "--save", "", "--appendonly", "no"]
            redis_argv += ["--port", str(redis_port), "--bind", "127.0.0.1"]
            redis_argv += ["--daemonize", "no", "--dir", str(state_dir)]
            started_at = time.time()
            broker = self._spawn("kafka", node.argv(), state_dir / BROKER_LOG)
            redis_child = self._spawn("redis-server", redis_argv, state_dir / REDIS_LOG)
            failure = self._wait_ready(broker, node.bootstrap, redis_child, redis_url)
            if failure is None:
                info = StackInfo(
                    bootstrap_servers=node.bootstrap,
                    redis_url=redis_url,
                    broker_pid=broker.proc.pid,
                    redis_pid=redis_child.proc.pid,
                    started_at=started_at,
                    state_dir=state_dir,
                    broker_bin=broker.exe,
                    redis_bin=redis_child.exe,
                    broker_start=_proc_start_time(broker.proc.pid),
                    redis_start=_proc_start_time(redis_child.proc.pid),
                    broker_version=f"Apache Kafka {kafka_broker.kafka_version()}",
                )
                _warm_up(node.bootstrap)
                _write_state(info)
                log.info("%s ready in %.1f s", info.broker_version, time.time() - started_at)
                return info
            for child in (broker, redis_child):
                _stop(child.proc.pid, child.exe, None, self._children.pop(child.proc.pid, None))
            last_error = failure
            if "in use" not in failure.lower() and "bindexception" not in failure.lower():
                break
        raise StackError(last_error)

    def _wait_ready(
        self, broker: _Child, bootstrap: str, redis_child: _Child, redis_url: str
    ) -> str | None:
        """None once both answer; otherwise a message with the failing process's log tail."""
        deadline = time.monotonic() + self.ready_timeout_s
        broker_ok = redis_ok = False
        while time.monotonic() < deadline:
            for child in (broker, redis_child):
                if child.proc.poll() is not None:
                    return (
                        f"{child.name} exited with code {child.proc.returncode} during start-up; "
                        f"last lines of {child.log_path}:\n{_log_tail(child.log_path)}"
                    )
            redis_ok = redis_ok or redis_healthy(redis_url, timeout=0.5)
            broker_ok = broker_ok or broker_healthy(bootstrap, timeout=1.0)
            if broker_ok and redis_ok:
                return None
            time.sleep(0.05)
        stuck = broker if not broker_ok else redis_child
        return (
            f"{stuck.name} did not answer within {self.ready_timeout_s:g} s; "
            f"last lines of {stuck.log_path}:\n{_log_tail(stuck.log_path)}"
        )


def _read_state(state_dir: Path) -> StackInfo | None:
    path = state_dir / STATE_FILE
    try:
        return StackInfo.from_json(json.loads(path.read_text()), state_dir)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StackError(
            f"{path} is unreadable ({exc}); delete it and run `nudgeflow dev up`"
        ) from exc


def _write_state(info: StackInfo) -> None:
    """Atomic write, so a reader never sees half a file."""
    tmp = info.state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    os.replace(tmp, info.state_file)


@contextlib.contextmanager
def embedded_stack(state_dir: Path) -> Iterator[StackInfo]:
    """Bring the stack up for the duration of a ``with`` block.

    A stack that was already running (e.g. from ``nudgeflow dev up``) is reused and left running.
    """
    stack = EmbeddedStack()
    info = stack.up(state_dir)
    try:
        yield info
    finally:
        if not info.reused:
            stack.down(state_dir)


# --------------------------------------------------------------------------- topics


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic NudgeFlow uses, with its topic-level config."""
    return {
        settings.topic_clickstream: {},
        settings.topic_clickstream_dlq: {},
        settings.topic_decisions: {},
        settings.topic_outcomes: {},
        settings.topic_contacts: {"cleanup.policy": "compact"},
        settings.topic_sms_dlq: {},
        settings.topic_ticks: {},
        settings.topic_conversions: {},
        settings.topic_delivery: {},
        settings.topic_inbound: {},
    }


def create_topics(bootstrap: str, settings: Settings, timeout: float = 15.0) -> list[str]:
    """Create all topics with ``settings.partitions`` partitions; return the newly created ones.

    Idempotent: topics that already exist are left as they are (even if their partition count
    differs). A broker that rejects a topic config gets the topic without it and a warning,
    since compaction only bounds disk use.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    client_errors: list[str] = []  # e.g. a refused login, which librdkafka only retries

    def on_error(err: KafkaError) -> None:
        client_errors.append(err.str())

    conf = {**settings.kafka_common(), "bootstrap.servers": bootstrap, "error_cb": on_error}
    admin = AdminClient(conf)
    specs = topic_specs(settings)

    def attempt(names: dict[str, dict[str, str]]) -> dict[str, KafkaError | None]:
        new = [
            NewTopic(n, settings.partitions, settings.replication_factor, config=c)
            for n, c in names.items()
        ]
        results: dict[str, KafkaError | None] = {}
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result(timeout=timeout)
                results[name] = None
            except KafkaException as exc:
                results[name] = exc.args[0]
            except concurrent.futures.TimeoutError:
                raise StackError(
                    f"creating topic {name} on {bootstrap} timed out after {timeout:g} s"
                    f"{last_client_error()}"
                ) from None
        return results

    def last_client_error() -> str:
        admin.poll(0)  # serves error_cb
        return f" (client error: {client_errors[-1]})" if client_errors else ""

    created: list[str] = []
    retry: dict[str, dict[str, str]] = {}
    for name, err in attempt(specs).items():
        if err is None:
            created.append(name)
        elif err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            continue
        elif specs[name] and err.code() in (
            KafkaError.INVALID_CONFIG,
            KafkaError.POLICY_VIOLATION,
            KafkaError.UNSUPPORTED_VERSION,
        ):
            log.warning(
                "broker rejected config %s for %s (%s); creating it without",
                specs[name],
                name,
                err.str(),
            )
            retry[name] = {}
        else:
            raise StackError(
                f"creating topic {name} on {bootstrap} failed: {err.str()}{last_client_error()}"
            )
    for name, err in (attempt(retry) if retry else {}).items():
        if err is None:
            created.append(name)
        elif err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise StackError(f"creating topic {name} on {bootstrap} failed: {err.str()}")

    # Wait until metadata lists every partition, so producers never race topic creation.
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=timeout)
        missing = [n for n in specs if n not in md.topics or md.topics[n].error is not None]
        if not missing:
            return created
        if time.monotonic() > deadline:
            raise StackError(f"topics {missing} not visible on {bootstrap} after {timeout:.0f} s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where stack.json and the logs live (default: settings.state_dir)",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("up", parents=[common], help="start broker + Redis and create the topics")
    sub.add_parser("down", parents=[common], help="stop the processes `up` started")
    sub.add_parser("status", parents=[common], help="print addresses and health")


def _print_info(info: StackInfo, out: IO[str]) -> None:
    def health(ok: bool) -> str:
        return "healthy" if ok else "NOT ANSWERING"

    print(
        f"broker  {info.bootstrap_servers:<28} pid {info.broker_pid:<8} "
        f"{health(info.broker_healthy)}  {info.broker_version or 'unknown broker'}",
        file=out,
    )
    print(
        f"redis   {info.redis_url:<28} pid {info.redis_pid:<8} {health(info.redis_healthy)}",
        file=out,
    )
    print(f"state   {info.state_file}  (up {time.time() - info.started_at:.0f} s)", file=out)


def run(args: argparse.Namespace) -> int:
    state_dir: Path = (args.state_dir or Settings.load(profile="dev").state_dir).resolve()
    stack = EmbeddedStack()
    out = sys.stdout
    try:
        if args.action == "up":
            info = stack.up(state_dir)
            settings = Settings.load(profile="dev", state_dir=state_dir)
            created = create_topics(info.bootstrap_servers, settings)
            print("reusing running stack" if info.reused else "stack started", file=out)
            _print_info(info, out)
            print(
                f"topics  {len(topic_specs(settings))} ready, {len(created)} created "
                f"({settings.partitions} partitions)",
                file=out,
            )
            print("\nexport NUDGEFLOW_PROFILE=dev", file=out)
            if state_dir != Settings(profile="dev").state_dir.resolve():
                print(f"export NUDGEFLOW_STATE_DIR={state_dir}", file=out)
            return 0
        if args.action == "down":
            stopped = stack.down(state_dir)
            print("stack stopped" if stopped else f"no stack recorded in {state_dir}", file=out)
            return 0
        status = stack.status(state_dir)
        if status is None:
            print(f"no stack recorded in {state_dir}; run `nudgeflow dev up`", file=out)
            return 1
        _print_info(status, out)
        return 0 if status.healthy else 1
    except StackError as exc:
        print(f"nudgeflow dev {args.action}: {exc}", file=sys.stderr)
        return 1
