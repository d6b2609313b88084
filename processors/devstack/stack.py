"""Start, reuse and stop the embedded broker and Redis (one redis-server, or a local Redis Cluster
of six) recorded in a state dir."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from processors.devstack import broker as kafka_broker
from processors.devstack.health import (
    broker_healthy,
    redis_cluster_healthy,
    redis_healthy,
    warm_up,
)
from processors.devstack.info import (
    STATE_FILE,
    RedisNode,
    StackError,
    StackInfo,
    read_state,
    write_state,
)
from processors.devstack.processes import (
    exe_of,
    free_ports,
    log_tail,
    owns,
    proc_start_time,
    stop_process,
)
from processors.devstack.redis_cluster import ClusterError, LocalRedisCluster

log = logging.getLogger("nudgeflow.devstack")


BROKER_LOG = "kafka.log"
BROKER_DIR = "kafka"
REDIS_LOG = "redis.log"
REDIS_CLUSTER_DIR = "redis-cluster"  # one directory (nodes.conf, redis.log) per node
READY_TIMEOUT_S = 60.0


REDIS_INSTALL_HINT = "sudo apt-get install -y redis-server"


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

    def up(self, state_dir: Path, *, redis_cluster: bool = False) -> StackInfo:
        """Start the stack (or reuse a healthy one) and return its addresses.

        ``redis_cluster``: a local Redis Cluster (3 masters + 3 replicas, URL
        ``redis+cluster://``) instead of one redis-server. A healthy stack with the other kind
        of Redis is never reused nor replaced: :class:`StackError` says to stop it first.
        """
        state_dir = Path(state_dir).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        redis_bin = redis_binary()
        with self._locked(state_dir):
            current = self.status(state_dir)
            if current is not None and current.healthy:
                if current.redis_cluster != redis_cluster:
                    wanted = "Redis Cluster" if redis_cluster else "single Redis"
                    raise StackError(
                        f"the stack running in {state_dir} has a {current.redis_kind}, not a "
                        f"{wanted}; stop it first with `nudgeflow dev down"
                        f"{_state_dir_arg(state_dir)}` (or run `nudgeflow dev up` "
                        f"{'with' if current.redis_cluster else 'without'} --redis-cluster "
                        "to reuse it)"
                    )
                return replace(current, reused=True)
            if current is not None:
                log.warning("stale or unhealthy stack in %s; restarting it", state_dir)
                self._down_unlocked(state_dir)
            return self._start(state_dir, redis_bin, redis_cluster)

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
        info = read_state(state_dir)
        if info is None:
            return None
        broker_ok = owns(info.broker_pid, info.broker_bin, info.broker_start) and broker_healthy(
            info.bootstrap_servers
        )
        if info.redis_cluster:
            redis_ok = all(
                owns(n.pid, info.redis_bin, n.start) for n in info.redis_nodes
            ) and redis_cluster_healthy([n.address for n in info.redis_nodes])
        else:
            redis_ok = owns(info.redis_pid, info.redis_bin, info.redis_start) and redis_healthy(
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
        info = read_state(state_dir)
        state_file = state_dir / STATE_FILE
        if info is None:
            state_file.unlink(missing_ok=True)
            return False
        recorded = [(info.broker_pid, info.broker_bin, info.broker_start)]
        if info.redis_cluster:
            recorded += [(n.pid, info.redis_bin, n.start) for n in info.redis_nodes]
        else:
            recorded.append((info.redis_pid, info.redis_bin, info.redis_start))
        for pid, binary, start in recorded:
            proc = self._children.pop(pid, None)
            if stop_process(pid, binary, start, proc):
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
        return _Child(name, proc, exe_of(proc.pid, argv[0]), log_path)

    def _start(self, state_dir: Path, redis_bin: str, redis_cluster: bool) -> StackInfo:
        # A free port can be taken by someone else between our probe and the bind; retry then.
        last_error = ""
        for _attempt in range(3):
            broker_port, controller_port, redis_port = free_ports(3)
            node = kafka_node(state_dir, broker_port, controller_port)
            shutil.rmtree(node.home, ignore_errors=True)  # a new stack starts empty
            try:
                node.prepare()
            except kafka_broker.KafkaSetupError as exc:
                raise StackError(str(exc)) from exc
            started_at = time.time()
            broker = self._spawn("kafka", node.argv(), state_dir / BROKER_LOG)
            nodes: tuple[RedisNode, ...] = ()
            if redis_cluster:  # starts (about 3 s) while the broker boots
                try:
                    cluster = self._start_cluster(state_dir, redis_bin)
                except StackError:
                    self._stop_children([broker])
                    raise
                redis_children = [child for child, _port in cluster]
                nodes = tuple(
                    RedisNode(port, child.proc.pid, proc_start_time(child.proc.pid))
                    for child, port in cluster
                )
                redis_url = f"redis+cluster://{nodes[0].address}"
                ready_url = None  # the cluster answered and serves every slot already
            else:
                redis_url = ready_url = f"redis://127.0.0.1:{redis_port}/0"
                redis_argv = [redis_bin, "--save", "", "--appendonly", "no"]
                redis_argv += ["--port", str(redis_port), "--bind", "127.0.0.1"]
                redis_argv += ["--daemonize", "no", "--dir", str(state_dir)]
                redis_children = [self._spawn("redis-server", redis_argv, state_dir / REDIS_LOG)]
            failure = self._wait_ready(broker, node.bootstrap, redis_children, ready_url)
            if failure is None:
                first = redis_children[0]
                info = StackInfo(
                    bootstrap_servers=node.bootstrap,
                    redis_url=redis_url,
                    broker_pid=broker.proc.pid,
                    redis_pid=first.proc.pid,
                    started_at=started_at,
                    state_dir=state_dir,
                    broker_bin=broker.exe,
                    redis_bin=first.exe,
                    broker_start=proc_start_time(broker.proc.pid),
                    redis_start=proc_start_time(first.proc.pid),
                    broker_version=f"Apache Kafka {kafka_broker.kafka_version()}",
                    redis_nodes=nodes,
                )
                warm_up(node.bootstrap)
                write_state(info)
                log.info("%s ready in %.1f s", info.broker_version, time.time() - started_at)
                return info
            self._stop_children([broker, *redis_children])
            last_error = failure
            if "in use" not in failure.lower() and "bindexception" not in failure.lower():
                break
        raise StackError(last_error)

    def _start_cluster(self, state_dir: Path, redis_bin: str) -> list[tuple[_Child, int]]:
        """A fresh local Redis Cluster under ``state_dir``, healthy: its nodes and their ports."""
        home = state_dir / REDIS_CLUSTER_DIR
        shutil.rmtree(home, ignore_errors=True)  # old nodes.conf files name an old cluster
        cluster = LocalRedisCluster(home, detach=True)
        try:
            cluster.start()
        except ClusterError as exc:
            raise StackError(f"the local Redis Cluster did not start: {exc}") from exc
        children = []
        for n in cluster.nodes:
            self._children[n.proc.pid] = n.proc
            exe = exe_of(n.proc.pid, redis_bin)
            children.append((_Child(f"redis-server {n.address}", n.proc, exe, n.log), n.port))
        return children

    def _stop_children(self, children: list[_Child]) -> None:
        for child in children:
            stop_process(child.proc.pid, child.exe, None, self._children.pop(child.proc.pid, None))

    def _wait_ready(
        self, broker: _Child, bootstrap: str, redis_children: list[_Child], redis_url: str | None
    ) -> str | None:
        """None once the broker and Redis (``redis_url``; None: already known to answer) answer;
        otherwise a message with the failing process's log tail."""
        deadline = time.monotonic() + self.ready_timeout_s
        broker_ok = False
        redis_ok = redis_url is None
        while time.monotonic() < deadline:
            for child in (broker, *redis_children):
                if child.proc.poll() is not None:
                    return (
                        f"{child.name} exited with code {child.proc.returncode} during start-up; "
                        f"last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                    )
            redis_ok = redis_ok or (redis_url is not None and redis_healthy(redis_url, timeout=0.5))
            broker_ok = broker_ok or broker_healthy(bootstrap, timeout=1.0)
            if broker_ok and redis_ok:
                return None
            time.sleep(0.05)
        stuck = broker if not broker_ok else redis_children[0]
        return (
            f"{stuck.name} did not answer within {self.ready_timeout_s:g} s; "
            f"last lines of {stuck.log_path}:\n{log_tail(stuck.log_path)}"
        )


@contextlib.contextmanager
def embedded_stack(state_dir: Path, *, redis_cluster: bool = False) -> Iterator[StackInfo]:
    """Bring the stack up for the duration of a ``with`` block.

    A stack that was already running (e.g. from ``nudgeflow dev up``) is reused and left running.
    """
    stack = EmbeddedStack()
    info = stack.up(state_dir, redis_cluster=redis_cluster)
    try:
        yield info
    finally:
        if not info.reused:
            stack.down(state_dir)


def _state_dir_arg(state_dir: Path) -> str:
    """`` --state-dir DIR`` unless ``state_dir`` is the dev profile's default."""
    from processors.settings import Settings

    default = Settings(profile="dev").state_dir.resolve()
    return "" if state_dir == default else f" --state-dir {state_dir}"
