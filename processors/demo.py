"""``nudgeflow demo``: the whole pipeline on the embedded stack, on a laptop, in one command.

Starts a fresh embedded stack (Apache Kafka + redis-server), imports the contacts, starts the Faust
worker and the dispatcher as separate processes (as in production), replays the events in event
time, marks end of input (which flushes pending timers), waits until the dispatcher has recorded
an outcome for everything, writes ``decisions.jsonl``, ``outcomes.jsonl`` and ``outbox.jsonl``,
prints a summary and shuts everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from processors.arguments import positive_rate
from processors.core.campaign import CampaignError, load_campaigns
from processors.core.decision import Decision, DecisionCancelled
from processors.settings import REPO_ROOT, Settings

EXAMPLES = REPO_ROOT / "examples"
CONTROL_HEADER = "nudgeflow-control"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Collected:
    decisions: dict[str, Decision] = field(default_factory=dict)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    outcomes: list[dict[str, object]] = field(default_factory=list)
    outcome_flushes: set[int] = field(default_factory=set)


def collect(settings: Settings, deadline: float, procs: list[subprocess.Popen[bytes]]) -> Collected:
    """Read decisions and outcomes until the dispatcher marks end of input on every partition."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas.codec import Codec

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer({**settings.kafka_common(), "group.id": "nudgeflow-demo-reader",
                         "enable.auto.commit": False})  # fmt: skip
    topics = [settings.topic_decisions, settings.topic_outcomes]
    assignment = []
    partitions: dict[str, int] = {}
    for t in topics:
        meta = consumer.list_topics(t, timeout=10).topics[t]
        partitions[t] = len(meta.partitions)
        assignment += [TopicPartition(t, p, OFFSET_BEGINNING) for p in meta.partitions]
    consumer.assign(assignment)
    got = Collected()
    try:
        while len(got.outcome_flushes) < partitions[settings.topic_outcomes]:
            if time.monotonic() > deadline:
                raise TimeoutError("the pipeline did not finish in time")
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a pipeline process exited early (code {p.returncode})")
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error():
                    continue
                headers = dict(msg.headers() or [])
                if CONTROL_HEADER in headers:
                    if msg.topic() == settings.topic_outcomes:
                        got.outcome_flushes.add(cast(int, msg.partition()))  # set on a record
                    continue
                name, rec = codec.decode(msg.value())
                if name == "TriggerDecision":
                    d = Decision.from_record(rec)
                    got.decisions[d.decision_id] = d
                elif name == "DecisionCancelled":
                    c = DecisionCancelled.from_record(rec)
                    if c.reason == "reordered":
                        got.decisions.pop(c.decision_id, None)
                    else:
                        got.cancellations.append(c)
                elif name == "SmsOutcome":
                    got.outcomes.append(rec)
    finally:
        consumer.close()
    return got


def load_inbound(path: Path) -> list[tuple[str, str, int]]:
    """``{"msisdn": "+14155550100", "text": "STOP", "ts": "2024-03-14T10:00:00Z"}`` lines ->
    ``(E.164 phone, opted_out|opted_in, at ms)`` for the STOP- and START-class keywords (HELP
    and other texts change nothing here). Bad lines are reported and skipped."""
    from processors.core.contact import normalize_phone
    from processors.core.events import parse_ts
    from processors.core.keywords import classify
    from processors.files import LineErrors, read_parsed

    def parse(obj: dict[str, object]) -> tuple[str, str, int] | None:
        raw = str(obj.get("msisdn") or "")
        phone = normalize_phone(raw if raw.startswith("+") else f"+{raw}")
        kind = classify(str(obj.get("text") or ""))
        at = parse_ts(obj.get("ts"))
        if kind not in ("stop", "start"):
            return None
        return phone, "opted_out" if kind == "stop" else "opted_in", at

    rows = read_parsed(path, parse, LineErrors(str(path)))
    return [row for _line, row in rows if row is not None]


def scrape_metrics(ports: Iterable[int], path: Path) -> None:
    """Every component's final Prometheus exposition, merged into one text file."""
    from urllib.request import urlopen

    from processors.metrics import merge_expositions, write_text

    texts = []
    for port in ports:
        with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
            texts.append(resp.read().decode())
    write_text(path, merge_expositions(texts))


def _outcome_json(rec: dict[str, object]) -> dict[str, object]:
    from processors.core.outcome import SmsOutcome

    return SmsOutcome.from_record(rec).to_json()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_demo(
    events: Path,
    campaigns: Path,
    contacts: Path,
    out: Path,
    timeout_s: float = 150,
    inbound: Path | None = None,
    rate_per_s: float | None = None,
) -> int:
    """``rate_per_s``: the dispatcher's gateway rate (None: its default, Vonage's 30/s)."""
    from processors.contacts_import import import_contacts
    from processors.devstack import EmbeddedStack, create_topics
    from processors.produce import produce_file

    started = time.monotonic()
    try:
        load_campaigns(campaigns)
    except CampaignError as exc:
        print(f"nudgeflow demo: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / ".stack"
    if state_dir.exists():
        EmbeddedStack().down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
    outbox = out / "outbox.jsonl"
    outbox.unlink(missing_ok=True)
    print("starting the embedded stack (Apache Kafka broker + redis-server)…", flush=True)
    stack = EmbeddedStack()
    info = stack.up(state_dir)
    print(f"broker: {info.broker_version} at {info.bootstrap_servers}", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = {
            **os.environ,
            "NUDGEFLOW_PROFILE": "dev",
            "NUDGEFLOW_STATE_DIR": str(state_dir),
            "NUDGEFLOW_CLOCK": "event",
            "NUDGEFLOW_CAMPAIGNS_FILE": str(campaigns.resolve()),
            "NUDGEFLOW_GATEWAY": "outbox",
            "NUDGEFLOW_OUTBOX_PATH": str(outbox.resolve()),
            "NUDGEFLOW_WORKER_WEB_PORT": str(_free_port()),
        }
        settings = Settings.load(
            profile="dev", state_dir=state_dir, clock="event", gateway="outbox",
            campaigns_file=campaigns.resolve(), outbox_path=outbox.resolve(),
        )  # fmt: skip
        create_topics(info.bootstrap_servers, settings)
        published, bad = import_contacts(contacts, settings)
        print(f"contacts: {published} imported, {bad} skipped", flush=True)
        if inbound is not None:
            # Replies at event times: each STOP/START holds from its own time in the replay.
            import redis

            from processors.redis_store import RedisStore

            store = RedisStore(redis.Redis.from_url(settings.redis_url))
            keywords = load_inbound(inbound)
            for phone, consent, at in keywords:
                store.record_keyword(phone, consent, at)
            print(f"inbound: {len(keywords)} STOP/START replies applied in event time", flush=True)
        exe = [sys.executable, "-m", "processors.cli"]
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        metrics_ports = {}
        for name in ("worker", "dispatcher"):
            argv = [*exe, name]
            if name == "dispatcher" and rate_per_s is not None:
                argv += ["--rate", str(rate_per_s)]
            log = (logs / f"{name}.log").open("wb")
            metrics_ports[name] = _free_port()
            proc_env = {**env, "NUDGEFLOW_METRICS_PORT": str(metrics_ports[name])}
            procs.append(subprocess.Popen(argv, env=proc_env, stdout=log, stderr=subprocess.STDOUT))
        print("worker and dispatcher started; replaying events in event time…", flush=True)
        sent, errors = produce_file(settings, events, flush=True, progress=False)
        print(f"events: {sent} produced, {len(errors)} bad lines skipped", flush=True)
        got = collect(settings, started + timeout_s, procs)
        scrape_metrics(metrics_ports.values(), out / "metrics.prom")
    finally:
        _stop(procs)
        stack.down(state_dir)
    decisions = sorted(got.decisions.values(), key=lambda d: (d.fire_at, d.decision_id))
    with (out / "decisions.jsonl").open("w", encoding="utf-8") as fh:
        for d in decisions:
            fh.write(json.dumps(d.to_json()) + "\n")
    outcomes = [_outcome_json(r) for r in got.outcomes]
    with (out / "outcomes.jsonl").open("w", encoding="utf-8") as fh:
        for o in outcomes:
            fh.write(json.dumps(o) + "\n")
    outbox.touch()
    final = {str(o["decision_id"]): o for o in outcomes}  # the last outcome per decision
    status = Counter(str(o["status"]) for o in final.values())
    reasons = Counter(
        f"{o['status']}:{o['reason']}" for o in final.values() if o["status"] != "sent"
    )
    print()
    texts = [json.loads(x) for x in outbox.read_text().splitlines() if x.strip()]
    for m in sorted(
        texts, key=lambda m: str(m["sent_at"])
    ):  # the demo's own outbox: show the text, never the phone number
        first_line = str(m["text"]).splitlines()[0]
        print(f"[text] {m['sent_at']} {m['campaign_id']} -> {m['user_id']}: {first_line}")
    print()
    print(f"events in:      {sent}")
    print(f"decisions:      {len(decisions)}")
    print(f"texts sent:     {status.get('sent', 0)}  (outbox: {outbox})")
    for key, n in sorted(reasons.items()):
        print(f"  {key:<28}{n}")
    print(f"files:          {out}/decisions.jsonl, outcomes.jsonl, outbox.jsonl, metrics.prom")
    from processors.report import write_demo_report  # same attribution core as the live shell

    print(f"report:         {write_demo_report(out, events, campaigns)}")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=Path, default=EXAMPLES / "events.jsonl")
    parser.add_argument("--campaigns", type=Path, default=EXAMPLES / "campaigns.yaml")
    parser.add_argument("--contacts", type=Path, default=EXAMPLES / "contacts.jsonl")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds before giving up")
    parser.add_argument(
        "--rate",
        type=positive_rate,
        help="gateway requests per second of the dispatcher (default 30, Vonage's limit; the "
        "outbox gateway takes any rate)",
    )
    parser.add_argument(
        "--inbound",
        type=Path,
        help='inbound texts (JSON Lines: {"msisdn": ..., "text": "STOP", "ts": ...}) applied '
        "in event time",
    )


def run(args: argparse.Namespace) -> int:
    for p in (args.events, args.campaigns, args.contacts):
        if not p.exists():
            print(f"nudgeflow demo: {p}: no such file", file=sys.stderr)
            return 2
    if args.inbound is not None and not args.inbound.exists():
        print(f"nudgeflow demo: {args.inbound}: no such file", file=sys.stderr)
        return 2
    return run_demo(
        args.events,
        args.campaigns,
        args.contacts,
        args.out,
        args.timeout,
        inbound=args.inbound,
        rate_per_s=args.rate,
    )
