"""A redis-server of a test module's own on a free loopback port (no broker needed)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from processors.devstack.processes import free_ports


def _free_port() -> int:
    return free_ports(1)[0]


def wait_until_answers(
    client: redis.Redis, proc: subprocess.Popen[bytes], timeout_s: float = 10.0
) -> None:
    """Until ``client`` gets an answer to PING; fails if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            assert proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@contextmanager
def own_redis() -> Iterator[str]:
    """Start redis-server without persistence, yield its URL, stop it (SIGTERM) on exit."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (sudo apt-get install -y redis-server)"
    port = _free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        try:
            wait_until_answers(client, proc)
        finally:
            client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
