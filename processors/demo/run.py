"""``run_demo``: the whole pipeline on a fresh embedded stack, as in production.

Starts the stack, imports the contacts, starts the worker and the dispatcher as separate
processes, replays the events in event time, marks end of input (which flushes pending timers),
waits until the dispatcher has recorded an outcome for everything and writes ``decisions.jsonl``,
``outcomes.jsonl``, ``outbox.jsonl`` and ``metrics.prom``. With ``shoppers`` the recipients then
respond (:mod:`.shoppers`). Ends with ``report.html`` and a summary per campaign, and shuts
everything down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from processors.core.campaign import CampaignError, load_campaigns
from processors.demo.collect import Collected, collect
from processors.demo.inbound import load_inbound
from processors.demo.shoppers import Performed, shoppers_respond
from processors.demo.summary import summary_table
from processors.devstack.processes import free_ports
from processors.settings import REPO_ROOT, Settings

EXAMPLES = REPO_ROOT / "examples"


def _free_port() -> int:
    return free_ports(1)[0]


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


def _start_processes(
    logs: Path, env: dict[str, str], rate_per_s: float | None, procs: list[subprocess.Popen[bytes]]
) -> dict[str, int]:
    """``nudgeflow worker`` and ``nudgeflow dispatcher`` as processes (appended to ``procs`` as
    they start, so the caller stops whatever started); returns their metrics ports."""
    exe = [sys.executable, "-m", "processors.commands.cli"]
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
    return metrics_ports


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
    redis_cluster: bool = False,
) -> int:
    """``rate_per_s``: the dispatcher's gateway rate (None: its default, Vonage's 30/s).

    ``shoppers``: after the pipeline has decided and sent, the recipients respond to the texts
    (:mod:`processors.demo.shoppers`, deterministic for ``seed``) through the webhook service
    and the clickstream; the report then attributes what the clickstream holds.

    ``redis_cluster``: every process (dispatcher, webhook service, the keyword import) uses a
    local Redis Cluster (3 masters + 3 replicas) instead of one redis-server."""
    from processors.commands.contacts import import_contacts
    from processors.commands.produce import produce_file
    from processors.devstack import EmbeddedStack, create_topics

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
    redis_kind = "a local Redis Cluster" if redis_cluster else "redis-server"
    print(f"starting the embedded stack (Apache Kafka broker + {redis_kind})…", flush=True)
    stack = EmbeddedStack()
    info = stack.up(state_dir, redis_cluster=redis_cluster)
    print(f"broker: {info.broker_version} at {info.bootstrap_servers}", flush=True)
    if info.redis_cluster:
        print(
            f"redis:  Redis Cluster of {len(info.redis_nodes)} nodes (3 masters + 3 replicas) "
            f"at {info.redis_url}",
            flush=True,
        )
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
            from processors.redis import RedisStore

            store = RedisStore.from_url(settings.redis_url)
            keywords = load_inbound(inbound)
            for phone, consent, at in keywords:
                store.record_keyword(phone, consent, at)
            print(f"inbound: {len(keywords)} STOP/START replies applied in event time", flush=True)
        metrics_ports = _start_processes(out / "logs", env, rate_per_s, procs)
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
            performed = shoppers_respond(
                settings, got, outbox, contacts, campaign_set, out, webhook_port, seed, progress
            )
    finally:
        _stop(procs)
        stack.down(state_dir)
    _write_results(out, got, outbox, sent, performed)
    from processors.report import build as report  # same attribution core as the live shell
    from processors.report.page import read_report_data

    if shoppers:
        target = out / "campaigns.yaml"
        if campaigns.resolve() != target.resolve():
            target.write_bytes(campaigns.read_bytes())
        page, figures = report.write_dir_report_with_figures(out)
    else:
        page = report.write_demo_report(out, events, campaigns)
        figures = read_report_data(page.read_text(encoding="utf-8"))
    print()
    print(summary_table(figures))
    print(f"report:         {page}")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


MAX_TEXTS_SHOWN = 30  # more texts than this: see outbox.jsonl and the report's samples


def _write_results(
    out: Path, got: Collected, outbox: Path, sent: int, performed: Performed | None
) -> None:
    """``decisions.jsonl`` and ``outcomes.jsonl``, then what happened, on stdout (the texts
    themselves when there are few; never a phone number)."""
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
