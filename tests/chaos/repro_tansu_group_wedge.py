"""Reproducer (not a test): a librdkafka consumer group on tansu 0.6 can wedge after every member
leaves at once.

Two members share a group and own its 4 partitions; both ``close()`` (LeaveGroup) within
milliseconds, as two dispatchers do when Redis goes away and they exit; two new members then
subscribe. On Kafka they get the partitions in a few seconds. On tansu they do sometimes (~4 s)
and sometimes never: in the chaos runs the group stayed without an owner for more than 6
minutes, and even a fresh consumer could not join it, while a new group on the same topic was
assigned in 3.5 s. Intermittent: 5 of 12 tries of this sequence wedged (60 s without owner).

Run: ``PYTHONPATH=. .venv/bin/python tests/chaos/repro_tansu_group_wedge.py [rounds]``; it
prints, per round, how long the second generation took to get its partitions (or "WEDGED").
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.chaos.harness import Broker


def generation(bootstrap: str, group: str, names: list[str], timeout_s: float) -> list[Consumer]:
    """Members that subscribe together; returns them once all own partitions (or at timeout)."""
    owned: dict[str, list[int]] = {}
    members = []
    for name in names:
        c = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": 6000,
             "heartbeat.interval.ms": 1000, "enable.auto.commit": False, "log_level": 2}
        )  # fmt: skip

        def on_assign(_c: Consumer, parts: list, name: str = name) -> None:
            owned[name] = [p.partition for p in parts]

        c.subscribe(["t"], on_assign=on_assign)
        members.append(c)
    deadline = time.monotonic() + timeout_s
    while len(owned) < len(names) and time.monotonic() < deadline:
        for c in members:
            c.poll(0.1)
    return members if len(owned) == len(names) else []


def main(rounds: int) -> int:
    wedged = 0
    for r in range(rounds):
        broker = Broker(Path(tempfile.mkdtemp(prefix="tansu-wedge-")))
        broker.start()
        try:
            admin = AdminClient({"bootstrap.servers": broker.bootstrap})
            for fut in admin.create_topics([NewTopic("t", 4, 1)]).values():
                fut.result()
            first = generation(broker.bootstrap, "g", ["a", "b"], 30)
            assert first, "the first generation never got its partitions"
            for c in first:
                c.close()  # both leave at once
            t0 = time.monotonic()
            second = generation(broker.bootstrap, "g", ["c", "d"], 60)
            took = time.monotonic() - t0
            print(f"round {r + 1}: " + (f"assigned after {took:.1f}s" if second else "WEDGED"))
            wedged += not second
            for c in second:
                c.close()
        finally:
            broker.stop()
    return 1 if wedged else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
