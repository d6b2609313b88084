"""The realistic day of ``nudgeflow demo``: a store's traffic, its customers, and their phones.

* :func:`write_day` generates one day of a store's clickstream with :mod:`processors.simulate`
  (fixed seed: every run is the same day) and the shoppers' contact profiles: several time zones
  (some known only from the phone number) and a consent mix (opted in, opted out, unknown, no
  contact on file).
* :func:`plan_responses` is what the shoppers do with the texts they get, in event time: click
  the short link, buy (or submit the form, complete the booking, check in at the event), reply
  STOP. It also lets some shoppers come back by themselves, text or no text, so the holdout has
  a baseline to compare with. This is a *model of the world* the demo simulates, stated here so
  nobody mistakes its figures for a measurement:

  - the chance to click falls with the time from the action to the text (intent half-life
    :data:`INTENT_HALF_LIFE_H` hours), so late texts (quiet hours, the slower timing variant)
    convert worse;
  - the ``copy-scarcity`` copy of cart recovery is clicked :data:`COPY_EFFECT` times as often;
  - a reminded attendee checks in more often than one who was not reminded.

* :func:`perform` carries the responses out through the real services: clicks and STOP replies
  as HTTP requests to the webhook service (``GET /l/{code}``, ``POST /webhooks/vonage/inbound``),
  purchases and check-ins as clickstream events produced like a shop's backend would.

Pure except :func:`write_day` (files) and :func:`perform` (HTTP, Kafka).
"""

from __future__ import annotations

import http.client
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from processors.core.events import make_event, parse_ts
from processors.simulate import DAY, HOUR, MINUTE, PRODUCTS, generate

if TYPE_CHECKING:
    from processors.core.campaign import CampaignSet
    from processors.core.decision import Decision
    from processors.settings import Settings

DAY_USERS = 2_000
DAY_SEED = 7
DAY_START_MS = 1_710_374_400_000  # 2024-03-14T00:00:00Z, a Thursday

# (zone, how to make the n-th phone number of that zone, share of contacts)
ZONES: tuple[tuple[str, Callable[[int], str], int], ...] = (
    ("America/New_York", lambda n: f"+1212555{n:04d}", 30),
    ("America/Los_Angeles", lambda n: f"+1415555{n:04d}", 20),
    ("Europe/London", lambda n: f"+447911{n:06d}", 24),
    ("Europe/Berlin", lambda n: f"+4930901{n:05d}", 8),
    ("Asia/Kolkata", lambda n: f"+9198765{n:05d}", 11),
    ("Australia/Sydney", lambda n: f"+614{12345000 + n:08d}", 7),
)
FIRST_NAMES = (
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Gia",
    "Hugo",
    "Ivy",
    "Jon",
    "Kai",
    "Lena",
    "Mo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
)
# Consent mix of the customer base: shares of the users (the rest are opted in).
NO_CONTACT = 0.05
OPTED_OUT = 0.08
UNKNOWN_CONSENT = 0.04
ZONE_FROM_PHONE = 0.15  # profiles without a time zone: the dispatcher derives it from the number

# The response model (see the module docstring).
INTENT_HALF_LIFE_H = 2.0
COPY_EFFECT = {"copy-scarcity": 1.35}
CLICK = {
    "cart-recovery": 0.24,
    "browse-revisit": 0.14,
    "form-dropoff": 0.2,
    "booking-incomplete": 0.22,
    "event-reminder": 0.16,
    "loyalty-gold": 0.12,
    "signup-confirm": 0.05,
}
CONVERT_AFTER_CLICK = {
    "cart-recovery": 0.5,
    "browse-revisit": 0.35,
    "form-dropoff": 0.6,
    "booking-incomplete": 0.55,
    "loyalty-gold": 0.3,
}
CONVERT_WITHOUT_CLICK = 0.04  # saw the text, came back to the site later
COMES_BACK_ANYWAY = {
    "cart-recovery": 0.07,
    "browse-revisit": 0.05,
    "form-dropoff": 0.08,
    "booking-incomplete": 0.09,
    "loyalty-gold": 0.04,
}
CHECK_IN = 0.55  # an event signup shows up at the door…
CHECK_IN_REMINDED = 0.2  # …this much more often when reminded
STOP_REPLY = 0.02


# --------------------------------------------------------------------------- the day


@dataclass(frozen=True)
class DayFiles:
    events: Path
    contacts: Path
    n_events: int
    n_contacts: int
    users: int


def day_events(users: int = DAY_USERS, seed: int = DAY_SEED, start_ms: int = DAY_START_MS) -> Any:
    """The simulated clickstream from ``start_ms`` to one day later (ts order)."""
    end = start_ms + DAY
    for event in generate(users, users * 1_000, seed, start_ms):
        if event.ts >= end:
            return
        yield event


def day_contacts(users: int = DAY_USERS, seed: int = DAY_SEED) -> list[dict[str, str]]:
    """Profiles of the simulated users ``u000001``…: zones, phone numbers, consent mix."""
    rng = random.Random(f"contacts:{seed}")
    weights = [w for _z, _p, w in ZONES]
    counters: Counter[str] = Counter()
    out = []
    for i in range(users):
        uid = f"u{i + 1:06d}"
        x = rng.random()
        zone, phone_of, _w = rng.choices(ZONES, weights)[0]
        counters[zone] += 1
        if x < NO_CONTACT:
            continue
        consent = (
            "opted_out"
            if x < NO_CONTACT + OPTED_OUT
            else "unknown"
            if x < NO_CONTACT + OPTED_OUT + UNKNOWN_CONSENT
            else "opted_in"
        )
        row = {
            "user_id": uid,
            "phone": phone_of(counters[zone]),
            "consent": consent,
            "first_name": FIRST_NAMES[int(rng.random() * len(FIRST_NAMES))],
        }
        if rng.random() >= ZONE_FROM_PHONE:
            row["timezone"] = zone
        out.append(row)
    return out


def write_day(
    directory: Path,
    users: int = DAY_USERS,
    seed: int = DAY_SEED,
    start_ms: int = DAY_START_MS,
    progress: bool = True,
) -> DayFiles:
    """``DIR/day-events.jsonl`` and ``DIR/day-contacts.jsonl`` (canonical JSON Lines)."""
    from tqdm import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    events = directory / "day-events.jsonl"
    contacts = directory / "day-contacts.jsonl"
    n = 0
    with (
        events.open("w", encoding="utf-8") as fh,
        tqdm(desc="1/5 generate a day", unit="ev", disable=not progress, leave=True) as bar,
    ):
        for event in day_events(users, seed, start_ms):
            fh.write(json.dumps(event.to_json()) + "\n")
            n += 1
            if not n % 1000:
                bar.update(1000)
        bar.update(n % 1000)
    rows = day_contacts(users, seed)
    contacts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DayFiles(events, contacts, n, len(rows), users)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Response:
    """One thing a shopper does: ``click`` a short link, reply ``stop``, or an ``event``."""

    ts: int
    kind: str
    user_id: str
    decision_id: str
    code: str | None = None
    event_type: str | None = None
    properties: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sent:
    """What the response model needs of a sent text."""

    decision_id: str
    sent_at: int
    text: str


def short_code(text: str) -> str | None:
    """The code of the first tracked short link (``…/l/{code}``) in a text."""
    from processors.core.links import find_urls

    for span in find_urls(text):
        path = urlsplit(span.url).path
        if path.startswith("/l/"):
            return path[3:]
    return None


def _value(props: Mapping[str, str], rng: random.Random) -> str:
    if props.get("cart_value"):
        return props["cart_value"]
    prices = {pid: cents for pid, _name, cents in PRODUCTS}
    cents = prices.get(props.get("product_id", ""), 1500 + int(rng.random() * 8000))
    return f"{cents // 100}.{cents % 100:02d}"


def _conversion_type(campaigns: CampaignSet, campaign_id: str) -> str:
    for c in campaigns.campaigns:
        if c.id == campaign_id:
            return sorted(c.conversion_events)[0]
    return "purchase"


def plan_responses(
    decisions: Iterable[Decision],
    final: Mapping[str, str],
    sent: Mapping[str, Sent],
    campaigns: CampaignSet,
    seed: int = DAY_SEED,
) -> list[Response]:
    """The shoppers' responses to the decisions, in ts order (deterministic for a seed).

    ``final``: decision id -> final status; ``sent``: the texts that went out, by decision id.
    """
    out: list[Response] = []
    for d in decisions:
        rng = random.Random(f"respond:{seed}:{d.decision_id}")
        r = rng.random
        kind = _conversion_type(campaigns, d.campaign_id)
        props = dict(d.properties)
        text = sent.get(d.decision_id) if final.get(d.decision_id) == "sent" else None
        if d.campaign_id == "event-reminder":
            start = props.get("event_start")
            if start:
                chance = CHECK_IN + (CHECK_IN_REMINDED if text is not None else 0.0)
                if r() < chance:
                    at = parse_ts(start) + int(r() * 30 * MINUTE)
                    out.append(
                        Response(
                            at,
                            "event",
                            d.user_id,
                            d.decision_id,
                            event_type=kind,
                            properties={"event_name": props.get("event_name", "")},
                        )
                    )
        elif r() < COMES_BACK_ANYWAY.get(d.campaign_id, 0.0):
            at = d.fire_at + HOUR + int(r() * 18 * HOUR)
            out.append(_conversion(d, kind, at, props, rng))
        if text is None:
            continue
        lag_h = max(0, text.sent_at - d.trigger_ts) / HOUR
        intent = 0.5 ** (lag_h / INTENT_HALF_LIFE_H)
        warm = 0.3 + 0.7 * intent
        code = short_code(text.text)
        p_click = CLICK.get(d.campaign_id, 0.1) * COPY_EFFECT.get(d.variant or "", 1.0) * warm
        converted_at: int | None = None
        if code is not None and r() < p_click:
            clicked = text.sent_at + MINUTE + int(r() * 20 * MINUTE)
            out.append(Response(clicked, "click", d.user_id, d.decision_id, code=code))
            if r() < CONVERT_AFTER_CLICK.get(d.campaign_id, 0.0) * (0.5 + 0.5 * intent):
                converted_at = clicked + 2 * MINUTE + int(r() * 25 * MINUTE)
        elif d.campaign_id in CONVERT_AFTER_CLICK and r() < CONVERT_WITHOUT_CLICK * warm:
            converted_at = text.sent_at + 30 * MINUTE + int(r() * 6 * HOUR)
        if converted_at is not None:
            out.append(_conversion(d, kind, converted_at, props, rng))
        if r() < STOP_REPLY:
            out.append(
                Response(
                    text.sent_at + 2 * MINUTE + int(r() * 30 * MINUTE),
                    "stop",
                    d.user_id,
                    d.decision_id,
                )
            )
    out.sort(key=lambda x: (x.ts, x.decision_id, x.kind))
    return out


def _conversion(
    d: Decision, kind: str, at: int, props: dict[str, str], rng: random.Random
) -> Response:
    extra: dict[str, str] = {}
    if kind == "purchase":
        extra = {"order_id": f"o-{d.decision_id[:12]}", "value": _value(props, rng)}
    elif kind == "form_submit" and props.get("form_name"):
        extra = {"form_name": props["form_name"]}
    elif kind == "booking_complete" and props.get("service"):
        extra = {"service": props["service"], "booking_id": f"b-{d.decision_id[:12]}"}
    return Response(at, "event", d.user_id, d.decision_id, event_type=kind, properties=extra)


# --------------------------------------------------------------------------- performing them


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

    from processors.produce import make_producer
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
    import time

    from confluent_kafka import Consumer, TopicPartition

    from processors.core.events import ClickEvent
    from processors.kafka.control import is_control
    from schemas.codec import Codec

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer(
        {
            **settings.kafka_common(),
            "group.id": "nudgeflow-demo-events",
            "enable.auto.commit": False,
        }
    )
    topic = settings.topic_clickstream
    rows: list[dict[str, Any]] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends: dict[int, int] = {}
        assignment = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError("reading the clickstream back took too long")
            for msg in consumer.consume(2000, timeout=0.5):
                if msg.error() is not None:
                    continue
                p = msg.partition() or 0
                if (msg.offset() or 0) + 1 >= ends.get(p, 0):
                    ends.pop(p, None)
                raw: Any = msg.headers() or []
                pairs = raw.items() if isinstance(raw, dict) else raw
                headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
                if is_control(headers):
                    continue
                _name, rec = codec.decode(msg.value())
                rows.append(ClickEvent.from_record(rec).to_json())
    finally:
        consumer.close()
    rows.sort(key=lambda e: (parse_ts(e["ts"]), str(e["event_id"])))
    return rows


def local_zone(contact: Mapping[str, Any], default_tz: str = "UTC") -> str:
    """The zone quiet hours use for a contact: its profile's, else from the phone number."""
    from processors.core.contact import Contact, resolve_timezone

    zone = resolve_timezone(
        Contact(user_id="-", phone=str(contact["phone"]), timezone=contact.get("timezone")),
        default_tz,
    )
    return str(zone.key)
