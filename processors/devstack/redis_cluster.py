"""A local Redis Cluster from the ``redis-server`` binary: masters and replicas on free loopback
ports, created with ``redis-cli --cluster create``, for the embedded stack and the tests.

Contract: :meth:`LocalRedisCluster.start` returns once every slot is served and every node
reports ``cluster_state:ok``; :meth:`stop` ends every node it started (SIGTERM, then SIGKILL).
Nodes keep no data on disk (``--save "" --appendonly no``), like the single dev Redis.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

NODE_TIMEOUT_MS = 2_000  # how long a master may be unreachable before its replica takes over
READY_TIMEOUT_S = 60.0


class ClusterError(RuntimeError):
    """The cluster could not be started or did not become healthy."""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports whose cluster bus ports (+10000) are free too."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port + 10_000 > 65_535:
                s.close()
                continue
            bus = socket.socket()
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                s.close()
                bus.close()
                continue
            held += [s, bus]
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def _fields(reply: object) -> dict[str, str]:
    """``key:value`` lines of an INFO-style reply."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


@dataclass
class ClusterNode:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )


@dataclass
class LocalRedisCluster:
    """``masters`` masters with ``replicas`` replicas each, under ``state_dir``. ``detach``: each
    node leads its own session (a Ctrl-C in the terminal that started it does not reach it), for
    a cluster that outlives the process that started it (``nudgeflow dev up --redis-cluster``)."""

    state_dir: Path
    masters: int = 3
    replicas: int = 1
    detach: bool = False
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A seed URL for a cluster client (any node; the client discovers the others)."""
        return f"redis://{self.nodes[0].address}/0"

    @property
    def startup_nodes(self) -> list[str]:
        return [n.address for n in self.nodes]

    def start(self) -> LocalRedisCluster:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise ClusterError(
                "redis-server/redis-cli are not on PATH; install them with:"
                " sudo apt-get install -y redis-server"
            )
        count = self.masters * (1 + self.replicas)
        if self.masters < 3:
            raise ClusterError("a Redis Cluster needs at least 3 masters")
        try:
            for port in _free_ports(count):
                self.nodes.append(self._spawn(binary, port))
            for node in self.nodes:
                self._wait_ping(node)
            create = [cli, "--cluster", "create", *self.startup_nodes]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise ClusterError(f"redis-cli --cluster create failed: {done.stdout[-400:]}")
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, binary: str, port: int) -> ClusterNode:
        home = self.state_dir / f"redis-{port}"
        home.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no"]
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        argv += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--dir", str(home)]
        argv += ["--save", "", "--appendonly", "no"]
        log = home / "redis.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
            )
        return ClusterNode(port, proc, log)

    def _wait_ping(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + 15
        client = node.client()
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError:
                    if node.proc.poll() is not None:
                        raise ClusterError(f"redis-server on {node.port} exited at start") from None
                    if time.monotonic() > deadline:
                        raise ClusterError(f"redis-server on {node.port} did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def wait_healthy(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every running node says ``cluster_state:ok`` with all 16384 slots served, sees
        ``masters`` live masters, and every running replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nodes if n.proc.poll() is None]
            if all(self._healthy(n) for n in running):
                return
            if time.monotonic() > deadline:
                raise ClusterError("the Redis Cluster did not become healthy in time")
            time.sleep(0.1)

    def _healthy(self, node: ClusterNode) -> bool:
        client = node.client()
        try:
            info = _fields(client.execute_command("CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            nodes = client.execute_command("CLUSTER", "NODES")
            text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
            masters = 0
            for line in text.splitlines():
                parts = line.split()
                flags = parts[2].split(",") if len(parts) > 2 else []
                if "master" in flags and "fail" not in flags and len(parts) > 8:
                    masters += 1  # a live master with slots
            if masters != self.masters:
                return False
            replication = _fields(client.execute_command("INFO", "replication"))
            return replication.get("role") == "master" or (
                replication.get("master_link_status") == "up"
            )
        except redis.RedisError:
            return False
        finally:
            client.close()

    def master_of(self, key: str) -> ClusterNode:
        """The node currently serving ``key``'s slot as master."""
        for node in self.nodes:
            if node.proc.poll() is not None:
                continue
            client = node.client()
            try:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise ClusterError("no node answered CLUSTER SLOTS")

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node (its replica takes over after about :data:`NODE_TIMEOUT_MS`)."""
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
