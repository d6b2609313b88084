"""Redis memory per contact, measured on a single redis-server and on a local Redis Cluster.

For each Redis (started here, empty, nothing on disk) the benchmark reads ``used_memory`` (on a
cluster: summed over the 3 masters; the 3 replicas hold the same again), then

1. imports ``--contacts`` profiles as the dispatcher's contacts follower stores them: each row
   (the demo day's mix of zones, consent and names) is validated by ``parse_contact_row``, goes
   through the ``ContactProfile`` Avro codec like a record of the contacts topic, and is written
   with ``put_contact`` and ``index_phone`` at its offset;
2. runs a day's decisions for ``--decided`` of the contacts through the dispatcher's decision
   path (``Decider``: ``prepare_many``/``settle_many`` batches of the real policy and the example
   campaigns) at 15:00 UTC, so recipients in quiet hours are deferred; half of them get a
   second decision of another campaign (most are capped). Every text the policy approves goes
   the sender's way: short links stored, ``remember_send``, the last check, the gateway's answer
   recorded; every outcome is marked as published.

Prints ``key=value`` lines: bytes per contact after the import and after the day, and the
extrapolation to one million contacts (MiB), per Redis. ``make bench-redis-memory`` runs it at
100,000 contacts; ``--contacts 1000000`` for the full size (a few minutes, ~1.5 GB of Redis).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import redis

from processors.core.campaign import load_campaigns
from processors.core.contact import parse_contact_row
from processors.core.decision import Decision, make_decision_id
from processors.core.links import LinkShortener
from processors.core.policy import Policy, Step
from processors.core.sms import SendResult
from processors.demo.day import DAY_START_MS, FIRST_NAMES, OPTED_OUT, UNKNOWN_CONSENT, ZONES
from processors.devstack.processes import free_ports
from processors.devstack.redis_cluster import LocalRedisCluster
from processors.dispatcher.deciding import Decider
from processors.dispatcher.inbox import Item
from processors.redis import RedisStore
from processors.settings import REPO_ROOT, Settings
from schemas.codec import Codec

CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"
NOW_MS = DAY_START_MS + 15 * 3_600_000  # 15:00 UTC: LA, Kolkata and Sydney are in quiet hours
CHUNK = 5_000  # contacts per task of a worker process
PIPELINE = 500  # contacts per pipeline (single Redis)
MIB = 1024 * 1024
FIRST = ("cart-recovery", {"product_name": "Trail Shoe", "link": "https://shop.example/cart"})
SECOND = ("browse-revisit", {"product_name": "Rain Jacket", "link": "https://shop.example/p/1"})


PHONES: dict[str, Callable[[int], str]] = {  # a number of the zone per contact, up to 10**6
    "America/New_York": lambda n: f"+1212{5550000 + n:07d}",
    "America/Los_Angeles": lambda n: f"+1415{5550000 + n:07d}",
    "Europe/London": lambda n: f"+447{400000000 + n:09d}",
    "Europe/Berlin": lambda n: f"+4930{20000000 + n:08d}",
    "Asia/Kolkata": lambda n: f"+919{800000000 + n:09d}",
    "Australia/Sydney": lambda n: f"+614{12000000 + n:08d}",
}


def contact_row(i: int) -> dict[str, str]:
    """The ``i``-th contact: the demo day's zones, names and consent mix, its own number."""
    rng = random.Random(i)
    zone = rng.choices([z for z, _p, _w in ZONES], [w for _z, _p, w in ZONES])[0]
    x = rng.random()
    consent = (
        "opted_out"
        if x < OPTED_OUT
        else "unknown"
        if x < OPTED_OUT + UNKNOWN_CONSENT
        else "opted_in"
    )
    row = {
        "user_id": f"u{i + 1:07d}",
        "phone": PHONES[zone](i),
        "consent": consent,
        "first_name": FIRST_NAMES[i % len(FIRST_NAMES)],
    }
    if rng.random() >= 0.15:
        row["timezone"] = zone
    return row


# ---------------------------------------------------------------------- worker processes

_store: RedisStore | None = None
_codec: Codec | None = None


def _worker_store(url: str) -> RedisStore:
    global _store
    if _store is None:
        _store = RedisStore.from_url(url)
    return _store


def import_chunk(url: str, start: int, end: int) -> int:
    """Contacts ``start`` .. ``end - 1`` stored as the contacts follower stores them. On a single
    Redis the store's calls go out in pipelines of :data:`PIPELINE` contacts (the same scripts
    and keys: every contact is new, so each ``put_contact`` stores it); on a cluster one call at
    a time (the phone index reads a reply there)."""
    global _codec
    codec = _codec = _codec or Codec("mock://nudgeflow")  # the dev profile's in-process registry
    client = _worker_store(url).r
    single = isinstance(client, redis.Redis)
    for a in range(start, end, PIPELINE):
        pipe = client.pipeline(transaction=False) if single else None
        store = RedisStore(pipe) if pipe is not None else _worker_store(url)
        for i in range(a, min(end, a + PIPELINE)):
            contact = parse_contact_row(contact_row(i))
            _name, record = codec.decode(codec.encode("ContactProfile", contact.to_record()))
            if store.put_contact(contact.user_id, record, i):
                phone = record.get("phone")
                store.index_phone(contact.user_id, phone if isinstance(phone, str) else None)
        if pipe is not None:
            replies = pipe.execute()
            assert all(replies[::2]), "a contact was not stored"
    return end - start


def _decision(campaign: tuple[str, dict[str, str]], user_id: str) -> Decision:
    campaign_id, properties = campaign
    event_id = f"e-{campaign_id}-{user_id}"
    return Decision(
        decision_id=make_decision_id(campaign_id, user_id, event_id),
        campaign_id=campaign_id,
        user_id=user_id,
        fire_at=NOW_MS,
        trigger_event_ids=(event_id,),
        trigger_ts=NOW_MS - 1_800_000,
        properties=dict(properties),
        clock="live",
        decided_at=NOW_MS - 1_800_000,
    )


def day_chunk(url: str, users: list[int]) -> dict[str, int]:
    """The day's decisions for the contacts ``users`` (their indexes): counts of what happened."""
    store = _worker_store(url)
    policy = Policy(load_campaigns(CAMPAIGNS), store)
    decider = Decider(policy, store, event_clock=False)
    links = LinkShortener(store, "https://nf.example", int(Settings().link_ttl_s * 1000))
    counts: dict[str, int] = {"decisions": 0, "sent": 0}

    def published(step: Step) -> None:
        for outcome in step.outcomes:
            store.mark_emitted(outcome_decision[outcome.decision_id], outcome.status)
            key = f"{outcome.status}:{outcome.reason}" if outcome.reason else outcome.status
            counts[key] = counts.get(key, 0) + 1

    def handle(step: Step, _item: Item) -> None:
        published(step)
        if step.send is not None:  # as the sender does it, with a gateway that accepts
            plan = links.apply(step.send)
            store.remember_send(plan.decision, plan.message.segments)
            gate = policy.begin_call(plan)
            if gate is not None:
                published(gate)
                return
            counts["sent"] += 1
            accepted = SendResult(f"m-{plan.decision.decision_id}", None, None, None)
            published(policy.complete(plan, accepted, NOW_MS))

    decisions = [_decision(FIRST, f"u{i + 1:07d}") for i in users]
    decisions += [_decision(SECOND, f"u{i + 1:07d}") for i in users[::2]]
    outcome_decision = {d.decision_id: d for d in decisions}
    queue = deque(Item(((("decisions", 0), n)), "decision", d) for n, d in enumerate(decisions))
    while queue:
        decider.decide(queue, list(queue), lambda: 1 << 30, lambda _item: NOW_MS, handle)
    counts["decisions"] = len(decisions)
    return counts


# ---------------------------------------------------------------------- the two Redis


class SingleRedis:
    label = "single"

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (port,) = free_ports(1)
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(home)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.ports = [port]
        deadline = time.monotonic() + 15
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=port) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def masters(self) -> list[int]:
        return self.ports

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class ClusterRedis:
    label = "cluster"

    def __init__(self, home: Path) -> None:
        self.cluster = LocalRedisCluster(home).start()
        self.url = f"redis+cluster://{self.cluster.nodes[0].address}"

    def masters(self) -> list[int]:
        ports = []
        for node in self.cluster.nodes:
            with node.client() as client:
                if client.execute_command("ROLE")[0] == b"master":
                    ports.append(node.port)
        return ports

    def stop(self) -> None:
        self.cluster.stop()


def used_memory(ports: list[int], field: str = "used_memory") -> int:
    """``field`` of ``INFO memory`` summed over the servers on ``ports``."""
    total = 0
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port) as client:
            total += int(client.info("memory")[field])  # type: ignore[index]
    return total


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def measure(
    backend: SingleRedis | ClusterRedis,
    n: int,
    decided: float,
    jobs: int,
    say: Callable[[str], None],
) -> dict[str, float]:
    masters = backend.masters()
    before = used_memory(masters)
    started = time.monotonic()
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(import_chunk, backend.url, a, b) for a, b in chunks(n, CHUNK)]
        imported = sum(f.result() for f in futures)
        say(f"{backend.label}: {imported} contacts imported in {time.monotonic() - started:.0f} s")
        contacts = used_memory(masters)
        every = max(1, round(1 / decided)) if decided > 0 else 0
        users = list(range(0, n, every)) if every else []
        started = time.monotonic()
        totals: dict[str, int] = {}
        days = [
            pool.submit(day_chunk, backend.url, users[a:b]) for a, b in chunks(len(users), CHUNK)
        ]
        for day in days:
            for key, value in day.result().items():
                totals[key] = totals.get(key, 0) + value
    say(
        f"{backend.label}: the day's decisions in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
    )
    after = used_memory(masters)
    return {
        "backlog": used_memory(masters, "mem_replication_backlog"),
        "contacts": n,
        "decided_users": len(users),
        "decisions": totals.get("decisions", 0),
        "sent": totals.get("sent", 0),
        "deferred": totals.get("deferred:quiet_hours", 0),
        "contact_bytes": (contacts - before) / n,
        "day_bytes": (after - contacts) / n,
        "bytes": (after - before) / n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument(
        "--decided", type=float, default=0.2, help="share of the contacts decided on the day"
    )
    parser.add_argument("--backend", choices=("single", "cluster", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=2, help="importing processes")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis_memory: redis-server is not on PATH (make redis)", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    kinds: list[type[SingleRedis] | type[ClusterRedis]] = [SingleRedis, ClusterRedis]
    kinds = [k for k in kinds if args.backend in ("both", k.label)]
    lines: list[str] = [f"redis_memory_contacts={args.contacts}"]
    with tempfile.TemporaryDirectory(prefix="nudgeflow-redis-memory-") as tmp:
        for kind in kinds:
            backend = kind(Path(tmp) / kind.label)
            try:
                r = measure(backend, args.contacts, args.decided, args.jobs, say)
            finally:
                backend.stop()
            p = f"redis_{backend.label}"
            lines += [
                f"{p}_decided_users={r['decided_users']:.0f}",
                f"{p}_decisions={r['decisions']:.0f}",
                f"{p}_sent={r['sent']:.0f}",
                f"{p}_deferred={r['deferred']:.0f}",
                f"{p}_contact_bytes_per_contact={r['contact_bytes']:.0f}",
                f"{p}_day_bytes_per_contact={r['day_bytes']:.0f}",
                f"{p}_bytes_per_contact={r['bytes']:.0f}",
                f"{p}_mib_per_million_contacts={r['bytes'] * 1e6 / MIB:.0f}",
            ]
            if backend.label == "cluster":
                lines += [
                    f"{p}_mib_per_million_contacts_with_replicas={2 * r['bytes'] * 1e6 / MIB:.0f}",
                    f"{p}_replication_backlog_bytes={r['backlog']:.0f}",  # fixed, in the delta
                ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
