"""``nudgeflow demo``: the whole pipeline on the embedded stack, on a laptop, in one command.

By default the demo is a realistic day of a store (:mod:`processors.demo_day`): about 2,000
shoppers' clickstream generated with ``nudgeflow simulate`` (fixed seed), their contacts in
several time zones with a consent mix, and how they answer the texts (clicks on the short links,
purchases, STOP replies). ``--events FILE`` replays a file of your own instead (e.g. the
hand-written ``examples/events.jsonl``).

Starts a fresh embedded stack (Apache Kafka + redis-server), imports the contacts, starts the Faust
worker and the dispatcher as separate processes (as in production), replays the events in event
time, marks end of input (which flushes pending timers), waits until the dispatcher has recorded an
outcome for everything, writes ``decisions.jsonl``, ``outcomes.jsonl`` and ``outbox.jsonl``. On the
realistic day the shoppers then respond through the webhook service (clicks, STOP replies) and the
shop's backend (purchases, check-ins), in event time. The demo ends with ``report.html`` and a
summary per campaign, and shuts everything down.
"""

from __future__ import annotations

import argparse
import gc
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
from typing import TYPE_CHECKING, Any, cast

from processors.arguments import positive_rate
from processors.core.campaign import CampaignError, CampaignSet, load_campaigns
from processors.core.decision import Decision, DecisionCancelled
from processors.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    from processors.demo_day import Performed

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


def collect(
    settings: Settings,
    deadline: float,
    procs: list[subprocess.Popen[bytes]],
    progress: bool = False,
) -> Collected:
    """Read decisions and outcomes until the dispatcher marks end of input on every partition."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from tqdm import tqdm

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
    bar = tqdm(desc="3/5 worker + dispatcher", unit="outcome", disable=not progress)
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
                    bar.update(1)
    finally:
        bar.close()
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
    *,
    shoppers: bool = False,
    seed: int = 7,
    progress: bool = False,
) -> int:
    """``rate_per_s``: the dispatcher's gateway rate (None: its default, Vonage's 30/s).

    ``shoppers``: after the pipeline has decided and sent, the recipients respond to the texts
    (:mod:`processors.demo_day`, deterministic for ``seed``) through the webhook service and the
    clickstream; the report then attributes what the clickstream holds."""
    from processors.contacts_import import import_contacts
    from processors.devstack import EmbeddedStack, create_topics
    from processors.produce import produce_file

    started = time.monotonic()
    try:
        campaign_set = load_campaigns(campaigns)
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
    for stale in ("opt_outs.jsonl", "zones.jsonl", "replies.jsonl"):
        (out / stale).unlink(missing_ok=True)
    webhook_port = _free_port()
    links = {"link_base_url": f"http://127.0.0.1:{webhook_port}"} if shoppers else {}
    print("starting the embedded stack (Apache Kafka broker + redis-server)…", flush=True)
    stack = EmbeddedStack()
    info = stack.up(state_dir)
    print(f"broker: {info.broker_version} at {info.bootstrap_servers}", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    performed = None
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
        if shoppers:  # tracked short links, served by the demo's webhook service
            env["NUDGEFLOW_LINK_BASE_URL"] = links["link_base_url"]
        settings = Settings.load(
            profile="dev", state_dir=state_dir, clock="event", gateway="outbox",
            campaigns_file=campaigns.resolve(), outbox_path=outbox.resolve(), **links,
        )  # fmt: skip
        create_topics(info.bootstrap_servers, settings)
        published, bad = import_contacts(contacts, settings)
        print(f"contacts: {published} imported, {bad} skipped", flush=True)
        if inbound is not None:
            # Replies at event times: each STOP/START holds from its own time in the replay.
            import redis

            from processors.redis import RedisStore

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
        sent, errors = produce_file(
            settings, events, flush=True, progress=progress, desc="2/5 replay the clickstream"
        )
        print(f"events: {sent} produced, {len(errors)} bad lines skipped", flush=True)
        got = collect(settings, started + timeout_s, procs, progress=progress)
        scrape_metrics(metrics_ports.values(), out / "metrics.prom")
        if shoppers:
            _stop(procs)  # the day is decided and sent; what follows is the shoppers' turn
            outbox.touch()
            performed = _shoppers_respond(
                settings, got, outbox, contacts, campaign_set, out, webhook_port, seed, progress
            )
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
    if len(texts) <= MAX_TEXTS_SHOWN:
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
    if performed is not None:
        print(
            f"shoppers:       {performed.clicks} link clicks, {performed.stops} STOP replies, "
            f"{performed.events} purchases/submits/check-ins (webhooks and clickstream)"
        )
    print(f"files:          {out}/decisions.jsonl, outcomes.jsonl, outbox.jsonl, metrics.prom")
    from processors import report  # same attribution core as the live shell

    if shoppers:
        target = out / "campaigns.yaml"
        if campaigns.resolve() != target.resolve():
            target.write_bytes(campaigns.read_bytes())
        page, figures = report.write_dir_report_with_figures(out)
    else:
        page = report.write_demo_report(out, events, campaigns)
        figures = report.read_report_data(page.read_text(encoding="utf-8"))
    print()
    print(summary_table(figures))
    print(f"report:         {page}")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


MAX_TEXTS_SHOWN = 30  # more texts than this: see outbox.jsonl and the report's samples


def _shoppers_respond(
    settings: Settings,
    got: Collected,
    outbox: Path,
    contacts: Path,
    campaigns: CampaignSet,
    out: Path,
    webhook_port: int,
    seed: int,
    progress: bool,
) -> Performed:
    """The recipients' turn: clicks and STOPs through the webhook service, purchases and
    check-ins onto the clickstream (event time); then the clickstream is read back into
    ``events.jsonl`` for the report, with ``opt_outs.jsonl`` and ``zones.jsonl``."""
    from processors import demo_day
    from processors.core.events import parse_ts
    from processors.files import LineErrors, read_parsed
    from processors.gateways.outbox import OutboxGateway
    from processors.webhooks import BackgroundServer, WebhookService, ensure_topics

    final: dict[str, str] = {}
    for rec in got.outcomes:
        if rec["status"] != "deferred":
            final[str(rec["decision_id"])] = str(rec["status"])
    sent = {}
    for line in outbox.read_text(encoding="utf-8").splitlines():
        if line.strip():
            m = json.loads(line)
            sent[m["decision_id"]] = demo_day.Sent(
                m["decision_id"], parse_ts(m["sent_at"]), str(m["text"])
            )
    plan = demo_day.plan_responses(got.decisions.values(), final, sent, campaigns, seed)
    rows = read_parsed(contacts, lambda obj: obj, LineErrors(str(contacts), echo=None))
    profiles = {str(r["user_id"]): r for _line, r in rows if r.get("user_id") and r.get("phone")}
    phones = {u: str(r["phone"]) for u, r in profiles.items()}
    ensure_topics(settings, [settings.topic_delivery, settings.topic_inbound])
    clock = demo_day.ReplayClock()
    # keyword confirmations go to their own file: outbox.jsonl holds the campaigns' texts
    gateway = OutboxGateway(out / "replies.jsonl", echo=None)
    service = WebhookService(settings, gateway, rate_per_s=1_000.0, clock=clock)
    with BackgroundServer(service, port=webhook_port) as server:
        done = demo_day.perform(settings, plan, server.url, clock, phones, progress)
        server.call(service.wait_replies())
    service.producer = None  # the service and its app refer to each other: free the client now
    del service
    gc.collect()
    events = demo_day.read_clickstream(settings)
    with (out / "events.jsonl").open("w", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps(e) + "\n")
    with (out / "opt_outs.jsonl").open("w", encoding="utf-8") as fh:
        for user, at in done.opt_outs:
            fh.write(json.dumps({"user_id": user, "at": at}) + "\n")
    with (out / "zones.jsonl").open("w", encoding="utf-8") as fh:  # no phone numbers here
        for user, r in sorted(profiles.items()):
            try:
                zone = demo_day.local_zone(r, settings.default_timezone)
            except Exception:  # noqa: BLE001 - a bad profile was skipped by the import too
                continue
            fh.write(json.dumps({"user_id": user, "timezone": zone}) + "\n")
    if done.refused:
        print(f"shoppers: refused by the webhooks: {dict(done.refused)}", flush=True)
    return done


def summary_table(figures: dict[str, Any]) -> str:
    """Per campaign: decided, sent, suppressed by reason, clicked, converted, lift over holdout."""
    head = (
        f"{'campaign':<20}{'decided':>8}{'sent':>6}{'clicked':>8}{'converted':>10}"
        f"{'conv%':>7}  {'lift over holdout [95% CI]':<42}not sent (reason: n)"
    )
    lines = [head, "-" * len(head)]
    for c in figures["campaigns"]:
        conv = c["conversion_rate"]
        lift = c["lift"]
        if lift is not None:
            mark = " significant" if lift["low"] > 0 or lift["high"] < 0 else ""
            lift_text = (
                f"{100 * lift['diff']:+.1f} pp [{100 * lift['low']:+.1f}, "
                f"{100 * lift['high']:+.1f}]{mark}"
            )
        else:
            lift_text = c.get("lift_why") or "-"
        not_sent = ", ".join(
            f"{k.split(':', 1)[1] or k.rstrip(':')}: {n}"
            for k, n in sorted(c["not_sent"].items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"{c['campaign_id']:<20}{c['decisions']:>8}{c['sent']:>6}"
            f"{_fig(c['clicked']):>8}{_fig(c['converted']):>10}"
            f"{'' if conv is None else f'{100 * conv:.1f}':>7}  {lift_text:<42}{not_sent or '-'}"
        )
    return "\n".join(lines)


def _fig(x: object) -> str:
    return "?" if x is None else str(x)


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
        from processors.demo_day import write_day

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
    )
