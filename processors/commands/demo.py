"""``nudgeflow demo``: the whole pipeline on the embedded stack, on a laptop, in one command.

By default the demo is a realistic day of a store (:mod:`processors.demo.day`, fixed seed) whose
shoppers answer the texts (:mod:`processors.demo.responses`); ``--events FILE`` replays a file of
your own instead (e.g. the hand-written ``examples/events.jsonl``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from processors.arguments import positive_rate
from processors.demo.run import EXAMPLES, run_demo

DAY_RATE = 1_000.0  # texts/s of the realistic day's outbox (Vonage's 30/s would pace ~40 s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events",
        type=Path,
        help="replay this events file (e.g. examples/events.jsonl) instead of the generated "
        "realistic day",
    )
    parser.add_argument("--campaigns", type=Path, default=EXAMPLES / "campaigns.yaml")
    parser.add_argument(
        "--contacts",
        type=Path,
        help="contacts file (default: the generated day's, or examples/contacts.jsonl with "
        "--events)",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds before giving up")
    parser.add_argument(
        "--users", type=int, default=2_000, help="shoppers of the generated day (default 2000)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated day")
    parser.add_argument(
        "--rate",
        type=positive_rate,
        help="gateway requests per second of the dispatcher (default 30, Vonage's limit, with "
        f"--events; {DAY_RATE:g} on the generated day: the outbox gateway takes any rate)",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run on a local Redis Cluster (3 masters + 3 replicas) instead of one redis-server",
    )
    parser.add_argument(
        "--inbound",
        type=Path,
        help='inbound texts (JSON Lines: {"msisdn": ..., "text": "STOP", "ts": ...}) applied '
        "in event time",
    )


def run(args: argparse.Namespace) -> int:
    day = args.events is None
    if day and args.users < 1:
        print("nudgeflow demo: --users must be at least 1", file=sys.stderr)
        return 2
    given = [p for p in (args.events, args.campaigns, args.contacts, args.inbound) if p]
    for p in given:
        if not p.exists():
            print(f"nudgeflow demo: {p}: no such file", file=sys.stderr)
            return 2
    events, contacts = args.events, args.contacts
    if day:
        from processors.demo.day import write_day

        files = write_day(args.out, args.users, args.seed, progress=True)
        print(
            f"a day of a store: {files.n_events} events of {files.users} shoppers, "
            f"{files.n_contacts} contacts (seed {args.seed})",
            flush=True,
        )
        events, contacts = files.events, contacts or files.contacts
    return run_demo(
        events,
        args.campaigns,
        contacts or EXAMPLES / "contacts.jsonl",
        args.out,
        args.timeout,
        inbound=args.inbound,
        rate_per_s=args.rate if args.rate is not None or not day else DAY_RATE,
        shoppers=day,
        seed=args.seed,
        progress=day,
        redis_cluster=args.redis_cluster,
    )
