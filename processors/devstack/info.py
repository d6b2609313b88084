"""Where the embedded stack listens (:class:`StackInfo`), kept in ``<state_dir>/stack.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """The embedded stack could not be started, stopped or used; the message says why."""


@dataclass(frozen=True)
class RedisNode:
    """One node of the stack's local Redis Cluster."""

    port: int
    pid: int
    start: int | None = None  # /proc start time (clock ticks) to detect recycled pids

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


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
    redis_nodes: tuple[RedisNode, ...] = ()  # a Redis Cluster's nodes; empty: a single Redis

    @property
    def redis_cluster(self) -> bool:
        """True when the stack's Redis is a local Redis Cluster (``redis+cluster://`` URL)."""
        return bool(self.redis_nodes)

    @property
    def redis_kind(self) -> str:
        return "Redis Cluster" if self.redis_cluster else "single Redis"

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
            "redis_cluster_nodes": [
                {"port": n.port, "pid": n.pid, "start": n.start} for n in self.redis_nodes
            ],
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
            redis_nodes=tuple(
                RedisNode(port=int(n["port"]), pid=int(n["pid"]), start=n.get("start"))
                for n in data.get("redis_cluster_nodes") or ()
            ),
        )


def read_state(state_dir: Path) -> StackInfo | None:
    path = state_dir / STATE_FILE
    try:
        return StackInfo.from_json(json.loads(path.read_text()), state_dir)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StackError(
            f"{path} is unreadable ({exc}); delete it and run `nudgeflow dev up`"
        ) from exc


def write_state(info: StackInfo) -> None:
    """Atomic write, so a reader never sees half a file."""
    tmp = info.state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    os.replace(tmp, info.state_file)
