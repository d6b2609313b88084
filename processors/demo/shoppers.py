"""The shoppers' turn of the demo, carried out through the real services.

Clicks and STOP replies are HTTP requests to the webhook service (``GET /l/{code}``,
``POST /webhooks/vonage/inbound``); purchases and check-ins are clickstream events produced as a
shop's backend would. The clickstream is then read back for the report.
"""

from __future__ import annotations

import gc
import http.client
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from processors.core.events import make_event, parse_ts
from processors.demo.collect import Collected
from processors.demo.day import local_zone
from processors.demo.responses import Response, Sent, plan_responses
from processors.topic_reader import read_to_end

if TYPE_CHECKING:
    from processors.core.campaign import CampaignSet
    from processors.settings import Settings


class ReplayClock:
    """The webhook service's clock during the replay: the time of the response being made."""

    def __init__(self, now_ms: int = 0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def _vonage_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class Performed:
    clicks: int = 0
    stops: int = 0
    events: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # "click:404" -> n
    opt_outs: list[tuple[str, int]] = field(default_factory=list)  # (user id, at)


def perform(
    settings: Settings,
    responses: list[Response],
    webhook_url: str,
    clock: ReplayClock,
    phones: Mapping[str, str],
    progress: bool = True,
) -> Performed:
    """Clicks and STOPs through the webhook service, events onto the clickstream."""
    from tqdm import tqdm

    from processors.commands.produce import make_producer
    from schemas.codec import Codec

    codec = Codec(settings.schema_registry_url)
    producer = make_producer(settings, 5)
    host = urlsplit(webhook_url)
    conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=30)
    done = Performed()
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    def request(method: str, path: str, body: str | None = None) -> int:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    try:
        for r in tqdm(responses, desc="4/5 shoppers respond", unit="act", disable=not progress):
            clock.now_ms = r.ts
            if r.kind == "click":
                status = request("GET", f"/l/{r.code}")
                if status == 302:
                    done.clicks += 1
                else:
                    done.refused[f"click:{status}"] += 1
            elif r.kind == "stop":
                phone = phones.get(r.user_id)
                if phone is None:
                    continue
                body = urlencode(
                    {
                        "msisdn": phone.lstrip("+"),
                        "to": "NUDGEFLOW",
                        "text": "STOP",
                        "type": "text",
                        "messageId": f"demo-stop-{r.decision_id[:24]}",
                        "message-timestamp": _vonage_time(r.ts),
                    }
                )
                status = request("POST", "/webhooks/vonage/inbound", body)
                if status == 200:
                    done.stops += 1
                    done.opt_outs.append((r.user_id, r.ts))
                else:
                    done.refused[f"stop:{status}"] += 1
            else:
                event = make_event(
                    f"react-{r.decision_id[:16]}-{r.event_type}",
                    r.user_id,
                    str(r.event_type),
                    r.ts,
                    None,
                    r.properties,
                )
                value = codec.encode("ClickEvent", event.to_record())
                producer.produce(
                    settings.topic_clickstream,
                    key=r.user_id.encode(),
                    value=value,
                    on_delivery=on_delivery,
                )
                producer.poll(0)
                done.events += 1
    finally:
        conn.close()
        remaining = producer.flush(30)
    if remaining or failures:
        raise RuntimeError(f"{remaining + len(failures)} response events were not delivered")
    return done


def read_clickstream(settings: Settings, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every event on the clickstream topic (the day, the clicks, the responses) as canonical
    JSON, in ts order: what the report attributes conversions with."""
    from confluent_kafka import Consumer

    from processors.core.events import ClickEvent
    from schemas.codec import Codec

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": "nudgeflow-demo-events",
            "enable.auto.commit": False,
        }
    )
    rows: list[dict[str, Any]] = []
    try:
        for msg in read_to_end(consumer, [settings.topic_clickstream], timeout_s):
            _name, rec = codec.decode(msg.value())
            rows.append(ClickEvent.from_record(rec).to_json())
    except TimeoutError:
        raise TimeoutError("reading the clickstream back took too long") from None
    finally:
        consumer.close()
    rows.sort(key=lambda e: (parse_ts(e["ts"]), str(e["event_id"])))
    return rows


def shoppers_respond(
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
            sent[m["decision_id"]] = Sent(m["decision_id"], parse_ts(m["sent_at"]), str(m["text"]))
    plan = plan_responses(got.decisions.values(), final, sent, campaigns, seed)
    rows = read_parsed(contacts, lambda obj: obj, LineErrors(str(contacts), echo=None))
    profiles = {str(r["user_id"]): r for _line, r in rows if r.get("user_id") and r.get("phone")}
    phones = {u: str(r["phone"]) for u, r in profiles.items()}
    ensure_topics(settings, [settings.topic_delivery, settings.topic_inbound])
    clock = ReplayClock()
    # keyword confirmations go to their own file: outbox.jsonl holds the campaigns' texts
    gateway = OutboxGateway(out / "replies.jsonl", echo=None)
    service = WebhookService(settings, gateway, rate_per_s=1_000.0, clock=clock)
    with BackgroundServer(service, port=webhook_port) as server:
        done = perform(settings, plan, server.url, clock, phones, progress)
        server.call(service.wait_replies())
    service.producer = None  # the service and its app refer to each other: free the client now
    del service
    gc.collect()
    events = read_clickstream(settings)
    with (out / "events.jsonl").open("w", encoding="utf-8") as fh:
        for e in events:
            fh.write(json.dumps(e) + "\n")
    with (out / "opt_outs.jsonl").open("w", encoding="utf-8") as fh:
        for user, at in done.opt_outs:
            fh.write(json.dumps({"user_id": user, "at": at}) + "\n")
    with (out / "zones.jsonl").open("w", encoding="utf-8") as fh:  # no phone numbers here
        for user, r in sorted(profiles.items()):
            try:
                zone = local_zone(r, settings.default_timezone)
            except Exception:  # noqa: BLE001 - a bad profile was skipped by the import too
                continue
            fh.write(json.dumps({"user_id": user, "timezone": zone}) + "\n")
    if done.refused:
        print(f"shoppers: refused by the webhooks: {dict(done.refused)}", flush=True)
    return done
