"""A private Apache Kafka broker for tests that hurt it: SIGKILL and restart, SIGSTOP/SIGCONT.

The session stack (tests/conftest.py) is shared and must stay healthy; a test that kills or
freezes a broker starts its own with :class:`KafkaProcess`. A restart keeps the ports and the
log directory, so clients reconnect to the same address and find every acknowledged record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
import time
from pathlib import Path

from processors.devstack import broker_healthy, kafka_node
from processors.devstack.processes import free_ports

READY_TIMEOUT_S = 60.0


def sasl_conf(user: str, password: str) -> dict[str, str]:
    """librdkafka settings of a client logging in to a :class:`KafkaProcess` with users."""
    return {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": user,
        "sasl.password": password,
    }


class KafkaProcess:
    """One single-node KRaft broker in ``home`` on fixed free loopback ports."""

    def __init__(
        self,
        home: Path,
        advertised_port: int | None = None,
        sasl_users: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``advertised_port``: where clients connect instead (a proxy in front of it);
        ``sasl_users``: clients must log in as one of them (SASL PLAIN; the first is the broker's
        own)."""
        broker_port, controller_port = free_ports(2)
        node = kafka_node(home, broker_port, controller_port)
        self.node = dataclasses.replace(
            node, advertised_port=advertised_port, sasl_users=sasl_users
        )
        self.direct = f"127.0.0.1:{broker_port}"
        self.log_path = home / "kafka.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return self.node.bootstrap

    def start(self) -> None:
        """Start (or restart on the same log directory) and wait until it answers metadata."""
        self.node.prepare()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.node.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kafka exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kafka did not answer in {READY_TIMEOUT_S:g} s")
            time.sleep(0.1)

    def _answers(self) -> bool:
        if not self.node.sasl_users:
            return broker_healthy(self.direct, timeout=1.0)
        user, password = self.node.sasl_users[0]
        return broker_healthy(self.direct, timeout=1.0, conf=sasl_conf(user, password))

    def kill(self) -> None:
        """SIGKILL the JVM (no clean shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGCONT (in case it is frozen), SIGTERM, SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
