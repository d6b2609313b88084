"""``nudgeflow report``: one self-contained HTML page that says which trigger converts.

Per campaign and variant: decisions, not-sent by reason, sent, delivered, clicked, converted,
conversion rate, lift over the holdout with a 95 % interval, revenue, the median time from the
trigger event to the send, and sends by hour of day; plus a table that flags triggers whose weekly
conversion rate fell. Plots are PNGs embedded as ``data:`` URIs (matplotlib, Agg canvas), so the
file can be mailed or attached to a ticket as it is.

Sources: ``--from DIR`` (a ``nudgeflow demo`` directory: decisions.jsonl, outcomes.jsonl, the
events file for clicks and conversions, deliveries.jsonl when present) attributes conversions
offline with the same pure core as the live ``nudgeflow attribution``; ``--from-kafka`` reads the
topics to their current end (sms-conversions for the attributed conversions).

Every figure is also in a ``<script type="application/json" id="nudgeflow-report-data">`` block
and in ``data-*`` attributes of the tables, so tools and tests read numbers, not prose.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from processors.core.attribution import (
    AttributionError,
    Click,
    Conversion,
    Rules,
    Touch,
    attribute_all,
    click_target,
)
from processors.core.campaign import CampaignError, CampaignSet, load_campaigns
from processors.core.events import ClickEvent, EventError, iso_ms, parse_ts
from processors.core.outcome import FINAL_STATUSES, OutcomeError, SmsOutcome
from processors.files import LineErrors, read_events, read_parsed

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
TREND_WEEKS = 4  # the "last weeks" the decline table looks at
TREND_DROP = 0.2  # flag when the latest week's rate is >= 20 % below the earlier weeks'
DATA_ID = "nudgeflow-report-data"
DELIVERED = "delivered"


class ReportError(RuntimeError):
    """The report cannot be built from this input; the message says what is missing."""


# --------------------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (sane at 0 %, 100 % and small n)."""
    if n <= 0:
        raise ValueError("wilson interval needs n > 0")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """p1 - p2 and its Newcombe hybrid-score interval (method 10, from two Wilson intervals).

    Chosen over Wald because conversion counts are small: Wald collapses to zero width at 0 %
    and overshoots [-1, 1]; Newcombe's interval keeps close to nominal coverage there.
    """
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, low, high


# --------------------------------------------------------------------------- input model


@dataclass(frozen=True, slots=True)
class DecisionRow:
    decision_id: str
    campaign_id: str
    user_id: str
    variant: str | None
    fire_at: int
    trigger_ts: int | None
    trigger_event_ids: tuple[str, ...] = ()


@dataclass
class ReportInput:
    """Everything the report counts; built from a directory or from the topics."""

    decisions: dict[str, DecisionRow]
    outcomes: dict[str, SmsOutcome]  # the final outcome per decision (absent: still pending)
    conversions: list[Conversion] | None  # None: no events / conversions to attribute with
    clicks: dict[str, int] | None  # decision id -> clicks on its link; None: unknown
    deliveries: dict[str, str] | None  # decision id -> delivery status; None: no receipts
    source: str
    campaigns: CampaignSet | None = None
    notes: list[str] = field(default_factory=list)
    zones: dict[str, str] | None = None  # user id -> IANA zone of the recipient; None: unknown
    texts: dict[str, str] | None = None  # decision id -> text as sent; None: no outbox
    opt_outs: list[tuple[str, int]] | None = None  # (user id, at) of STOP replies; None: unknown


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} is missing or not a string")
    return value


def parse_decision_line(obj: dict[str, Any]) -> DecisionRow:
    """A ``decisions.jsonl`` line (``Decision.to_json``) or a ``TriggerDecision`` record."""
    try:
        fire_at = parse_ts(obj.get("fire_at"))
        raw_trigger = obj.get("trigger_ts")
        ids = obj.get("trigger_event_ids") or ()
        if not isinstance(ids, list | tuple) or not all(isinstance(i, str) for i in ids):
            raise ValueError("trigger_event_ids must be a list of strings")
        variant = obj.get("variant")
        return DecisionRow(
            decision_id=_str(obj, "decision_id"),
            campaign_id=_str(obj, "campaign_id"),
            user_id=_str(obj, "user_id"),
            variant=variant if isinstance(variant, str) else None,
            fire_at=fire_at,
            trigger_ts=None if raw_trigger in (None, "") else parse_ts(raw_trigger),
            trigger_event_ids=tuple(ids),
        )
    except EventError as exc:
        raise ValueError(f"bad decision: {exc}") from None


def parse_outcome_line(obj: dict[str, Any]) -> SmsOutcome:
    """An ``outcomes.jsonl`` line (``SmsOutcome.to_json``: ISO times) or a record (epoch ms)."""
    try:
        rec = dict(obj)
        rec["at"] = parse_ts(obj.get("at"))
        if obj.get("due_at") not in (None, ""):
            rec["due_at"] = parse_ts(obj["due_at"])
        return SmsOutcome.from_record(rec)
    except (EventError, OutcomeError) as exc:
        raise ValueError(f"bad outcome: {exc}") from None


def parse_delivery_line(obj: dict[str, Any]) -> tuple[str, str]:
    """(decision id, status) of a delivery receipt; the decision id travels as client-ref."""
    decision_id = obj.get("decision_id") or obj.get("client_ref") or obj.get("client-ref")
    status = obj.get("status")
    if not isinstance(decision_id, str) or not decision_id:
        raise ValueError("delivery receipt has no decision_id / client_ref")
    if not isinstance(status, str) or not status:
        raise ValueError("delivery receipt has no status")
    return decision_id, status.lower()


def final_outcomes(outcomes: Iterable[SmsOutcome]) -> dict[str, SmsOutcome]:
    """The last final outcome of each decision (a ``deferred`` is not final)."""
    out: dict[str, SmsOutcome] = {}
    for o in outcomes:
        if o.status in FINAL_STATUSES:
            out[o.decision_id] = o
    return out


def fold_deliveries(receipts: Iterable[tuple[str, str]]) -> dict[str, str]:
    """One state per decision: ``delivered`` once any part was delivered, else the last status."""
    out: dict[str, str] = {}
    for decision_id, status in receipts:
        if out.get(decision_id) != DELIVERED:
            out[decision_id] = status
    return out


def touches_of(outcomes: dict[str, SmsOutcome]) -> list[Touch]:
    return [t for o in outcomes.values() if (t := Touch.from_outcome(o)) is not None]


# --------------------------------------------------------------------------- loading


def _lines(path: Path, parse: Any, notes: list[str]) -> list[Any]:
    errors = LineErrors(str(path), echo=None)
    rows = [row for _line, row in read_parsed(path, parse, errors)]
    for line, reason in errors.errors[:5]:
        notes.append(f"{path.name}:{line}: skipped: {reason}")
    if len(errors) > 5:
        notes.append(f"{path.name}: {len(errors) - 5} more bad lines skipped")
    return rows


def _campaigns(path: Path | None, fallback: Path | None) -> CampaignSet | None:
    for p in (path, fallback):
        if p is not None and p.exists():
            return load_campaigns(p)
    if path is not None:
        raise ReportError(f"campaign file {path}: not found")
    return None


def load_dir(
    directory: Path, events: Path | None = None, campaigns: Path | None = None
) -> tuple[ReportInput, list[ClickEvent] | None]:
    """Read a demo directory. Conversions come from attributing the events file offline
    (``--events``, default ``DIR/events.jsonl``), else from ``DIR/conversions.jsonl``."""
    from processors.settings import Settings

    decisions_file = directory / "decisions.jsonl"
    outcomes_file = directory / "outcomes.jsonl"
    for p in (decisions_file, outcomes_file):
        if not p.is_file():
            raise ReportError(f"{p}: no such file (is {directory} a `nudgeflow demo` output?)")
    if events is not None and not events.is_file():
        raise ReportError(f"events file {events}: not found")
    notes: list[str] = []
    decisions = {d.decision_id: d for d in _lines(decisions_file, parse_decision_line, notes)}
    outcomes = final_outcomes(_lines(outcomes_file, parse_outcome_line, notes))
    default_campaigns = directory / "campaigns.yaml"
    if not default_campaigns.exists():
        default_campaigns = Settings().campaigns_file
    cs = _campaigns(campaigns, default_campaigns)
    deliveries_file = directory / "deliveries.jsonl"
    deliveries = (
        fold_deliveries(_lines(deliveries_file, parse_delivery_line, notes))
        if deliveries_file.is_file()
        else None
    )
    events_file = events or directory / "events.jsonl"
    conversions: list[Conversion] | None = None
    clicks: dict[str, int] | None = None
    event_list: list[ClickEvent] | None = None
    if events_file.is_file():
        errors = LineErrors(str(events_file), echo=None)
        event_list = list(read_events(events_file, errors))
        if len(errors):
            notes.append(f"{events_file.name}: {len(errors)} bad lines skipped")
        result = attribute_all(event_list, touches_of(outcomes), Rules(cs.campaigns if cs else ()))
        conversions, clicks = result.conversions, result.clicks
        if result.bad_values:
            notes.append(f"{result.bad_values} conversion events had an unreadable value")
        _fill_trigger_ts(decisions, event_list)
    elif (directory / "conversions.jsonl").is_file():
        conversions = _lines(directory / "conversions.jsonl", Conversion.from_record, notes)
        notes.append("no events file: conversions read from conversions.jsonl, clicks unknown")
    else:
        notes.append("no events file: conversions and clicks are unknown")
    data = ReportInput(
        decisions, outcomes, conversions, clicks, deliveries, str(directory), cs, notes
    )
    _load_extras(directory, data)
    return data, event_list


def _load_extras(directory: Path, data: ReportInput) -> None:
    """Optional files of a demo directory: recipients' zones, the texts as sent, STOP replies."""

    def zone_line(obj: dict[str, Any]) -> tuple[str, str]:
        return _str(obj, "user_id"), _str(obj, "timezone")

    def text_line(obj: dict[str, Any]) -> tuple[str, str]:
        return _str(obj, "decision_id"), _str(obj, "text")

    def stop_line(obj: dict[str, Any]) -> tuple[str, int]:
        return _str(obj, "user_id"), parse_ts(obj.get("at"))

    if (directory / "zones.jsonl").is_file():
        data.zones = dict(_lines(directory / "zones.jsonl", zone_line, data.notes))
    if (directory / "outbox.jsonl").is_file():
        data.texts = dict(_lines(directory / "outbox.jsonl", text_line, data.notes))
    if (directory / "opt_outs.jsonl").is_file():
        data.opt_outs = _lines(directory / "opt_outs.jsonl", stop_line, data.notes)


def _fill_trigger_ts(decisions: dict[str, DecisionRow], events: list[ClickEvent]) -> None:
    """decisions.jsonl has no trigger_ts: use the latest of the decision's trigger events."""
    ts = {e.event_id: e.ts for e in events}
    for key, d in list(decisions.items()):
        if d.trigger_ts is None:
            found = [ts[i] for i in d.trigger_event_ids if i in ts]
            if found:
                decisions[key] = DecisionRow(
                    d.decision_id, d.campaign_id, d.user_id, d.variant, d.fire_at,
                    max(found), d.trigger_event_ids,
                )  # fmt: skip


def _headers(msg: Any) -> list[tuple[str, bytes | None]]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def load_kafka(settings: Any, timeout_s: float = 30.0) -> ReportInput:
    """Read decisions, outcomes, conversions, clicks and receipts to the topics' current end."""
    from confluent_kafka import Consumer, TopicPartition

    from processors.core.decision import Decision, DecisionCancelled
    from processors.kafka.control import is_control
    from schemas.codec import Codec, CodecError

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer(
        {**settings.kafka_common(), "group.id": "nudgeflow-report", "enable.auto.commit": False}
    )
    notes: list[str] = []
    decisions: dict[str, DecisionRow] = {}
    outcomes: list[SmsOutcome] = []
    conversions: dict[str, Conversion] = {}
    raw_clicks: list[Click] = []
    receipts: list[tuple[str, str]] = []
    delivery_topic = getattr(settings, "topic_delivery", None)
    topics = [
        settings.topic_decisions,
        settings.topic_outcomes,
        settings.topic_conversions,
        settings.topic_clickstream,
    ]
    try:
        listed = consumer.list_topics(timeout=10).topics
        if delivery_topic and delivery_topic in listed:
            topics.append(delivery_topic)
        missing = [t for t in topics if t not in listed]
        if missing:
            raise ReportError(f"topic(s) {', '.join(missing)} do not exist")
        ends: dict[tuple[str, int], int] = {}
        assignment = []
        for t in topics:
            for p in listed[t].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                if high > low:
                    ends[(t, p)] = high
                    assignment.append(TopicPartition(t, p, low))
        consumer.assign(assignment)
        bad = 0
        deadline = time.monotonic() + timeout_s
        while ends:
            if time.monotonic() > deadline:
                raise ReportError("timed out reading the topics")
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is not None:
                    continue
                key = (msg.topic() or "", msg.partition() or 0)
                if (msg.offset() or 0) + 1 >= ends.get(key, 0):
                    ends.pop(key, None)
                if is_control(_headers(msg)):
                    continue
                try:
                    name, rec = codec.decode(msg.value())
                    if name == "TriggerDecision":
                        d = Decision.from_record(rec)
                        decisions[d.decision_id] = DecisionRow(
                            d.decision_id, d.campaign_id, d.user_id, d.variant, d.fire_at,
                            d.trigger_ts, d.trigger_event_ids,
                        )  # fmt: skip
                    elif name == "DecisionCancelled":
                        c = DecisionCancelled.from_record(rec)
                        if c.reason == "reordered":
                            decisions.pop(c.decision_id, None)
                    elif name == "SmsOutcome":
                        outcomes.append(SmsOutcome.from_record(rec))
                    elif name == "Conversion":
                        conv = Conversion.from_record(rec)
                        conversions[conv.conversion_id] = conv
                    elif name == "ClickEvent":
                        click = Click.from_event(ClickEvent.from_record(rec))
                        if click is not None:
                            raw_clicks.append(click)
                    elif name == "DeliveryReceipt" and rec.get("decision_id"):
                        receipts.append(parse_delivery_line(rec))  # no id: not our text
                except (CodecError, ValueError, KeyError, AttributionError):
                    bad += 1
        if bad:
            notes.append(f"{bad} records could not be read and were skipped")
    finally:
        consumer.close()
    finals = final_outcomes(outcomes)
    touches: dict[str, list[Touch]] = defaultdict(list)
    for t in touches_of(finals):
        touches[t.user_id].append(t)
    clicks: dict[str, int] = Counter()
    for k in raw_clicks:
        target = click_target(k, touches.get(k.user_id, ()))
        if target is not None:
            clicks[target] += 1
    cs = _campaigns(None, getattr(settings, "campaigns_file", None))
    return ReportInput(
        decisions=decisions,
        outcomes=finals,
        conversions=sorted(conversions.values(), key=lambda c: (c.ts, c.conversion_id)),
        clicks=dict(clicks),
        deliveries=fold_deliveries(receipts) if delivery_topic in topics else None,
        source=f"Kafka {settings.bootstrap_servers}",
        campaigns=cs,
        notes=notes,
    )


# --------------------------------------------------------------------------- figures


@dataclass
class Group:
    """Counts of one (campaign, variant) row, or of a whole campaign (``variant`` "*")."""

    campaign_id: str
    variant: str | None
    decisions: int = 0
    not_sent: Counter[str] = field(default_factory=Counter)  # "status:reason" -> n
    sent: int = 0
    delivered: int = 0
    clicked: int = 0
    converted: int = 0  # sent decisions with >= 1 attributed conversion
    conversions: int = 0
    holdout: int = 0
    holdout_converted: int = 0
    revenue: Decimal = Decimal(0)
    holdout_revenue: Decimal = Decimal(0)
    lags_ms: list[int] = field(default_factory=list)
    by_hour: list[int] = field(default_factory=lambda: [0] * 24)
    by_local_hour: list[int] = field(default_factory=lambda: [0] * 24)
    stops: int = 0

    def figures(self, known: dict[str, bool]) -> dict[str, Any]:
        rate = self.converted / self.sent if self.sent else None
        holdout_rate = self.holdout_converted / self.holdout if self.holdout else None
        lift = None
        if self.sent and self.holdout and known["conversions"]:
            d, low, high = newcombe(self.converted, self.sent, self.holdout_converted, self.holdout)
            lift = {"diff": d, "low": low, "high": high, "significant": low > 0 or high < 0}
        suppressed = {
            k.split(":", 1)[1]: n for k, n in self.not_sent.items() if k.startswith("suppressed:")
        }
        return {
            "campaign_id": self.campaign_id,
            "variant": self.variant,
            "decisions": self.decisions,
            "suppressed": dict(sorted(suppressed.items())),
            "not_sent": dict(sorted(self.not_sent.items())),
            "sent": self.sent,
            "delivered": self.delivered if known["deliveries"] else None,
            "clicked": self.clicked if known["clicks"] else None,
            "converted": self.converted if known["conversions"] else None,
            "conversions": self.conversions if known["conversions"] else None,
            "conversion_rate": rate if known["conversions"] else None,
            "holdout": self.holdout,
            "holdout_converted": self.holdout_converted if known["conversions"] else None,
            "holdout_rate": holdout_rate if known["conversions"] else None,
            "lift": lift,
            "revenue": str(self.revenue) if known["conversions"] else None,
            "holdout_revenue": str(self.holdout_revenue) if known["conversions"] else None,
            "median_trigger_to_send_s": (
                statistics.median(self.lags_ms) / 1000 if self.lags_ms else None
            ),
            "trigger_to_send_s": _quantiles(self.lags_ms),
            "trigger_to_send_bins": _bins(self.lags_ms),
            "sends_by_hour": list(self.by_hour),
            "sends_by_local_hour": list(self.by_local_hour) if known["zones"] else None,
            "click_rate": self.clicked / self.sent if self.sent and known["clicks"] else None,
            "stops": self.stops if known["opt_outs"] else None,
        }


# Trigger->send buckets: upper bounds in seconds (the last one is open).
LAG_BINS: tuple[tuple[str, float], ...] = (
    ("< 1 min", 60), ("1-5 min", 300), ("5-15 min", 900), ("15-30 min", 1800),
    ("30-60 min", 3600), ("1-2 h", 7200), ("2-4 h", 14400), ("4-12 h", 43200),
    ("12-24 h", 86400), ("> 1 day", math.inf),
)  # fmt: skip


def _quantiles(lags_ms: list[int]) -> dict[str, float] | None:
    """p10/p25/p50/p75/p90 of trigger->send in seconds (nearest rank)."""
    if not lags_ms:
        return None
    xs = sorted(lags_ms)
    pick = {f"p{q}": xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))] / 1000
            for q in (10, 25, 50, 75, 90)}  # fmt: skip
    pick["max"] = xs[-1] / 1000
    return pick


def _bins(lags_ms: list[int]) -> list[int]:
    out = [0] * len(LAG_BINS)
    for lag in lags_ms:
        seconds = lag / 1000
        out[next(i for i, (_n, top) in enumerate(LAG_BINS) if seconds < top)] += 1
    return out


@lru_cache(maxsize=512)
def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _week(ms: int) -> str:
    day = datetime.fromtimestamp(ms / 1000, UTC).date()
    return (day - timedelta(days=day.weekday())).isoformat()  # the week's Monday (UTC)


def compute(data: ReportInput) -> dict[str, Any]:
    """All figures of the report as plain JSON-able data (the page renders this)."""
    known = {
        "conversions": data.conversions is not None,
        "clicks": data.clicks is not None,
        "deliveries": data.deliveries is not None,
        "zones": data.zones is not None,
        "opt_outs": data.opt_outs is not None,
    }
    groups: dict[tuple[str, str | None], Group] = {}
    totals: dict[str, Group] = {}
    won: dict[str, list[Conversion]] = defaultdict(list)
    for c in data.conversions or ():
        won[c.decision_id].append(c)
    weekly: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for d in sorted(data.decisions.values(), key=lambda d: (d.campaign_id, d.fire_at)):
        key = (d.campaign_id, d.variant)
        for g in (
            groups.setdefault(key, Group(*key)),
            totals.setdefault(d.campaign_id, Group(d.campaign_id, "*")),
        ):
            _count(g, d, data, won.get(d.decision_id, []))
        o = data.outcomes.get(d.decision_id)
        if o is not None and o.status == "sent":
            week = weekly[d.campaign_id][_week(o.at)]
            week[0] += 1
            week[1] += bool(won.get(d.decision_id))
    for user, at in data.opt_outs or ():
        last = _last_text_before(data, user, at)
        if last is not None:
            for g in (groups[(last.campaign_id, last.variant)], totals[last.campaign_id]):
                g.stops += 1
    orphans = sum(1 for k in data.outcomes if k not in data.decisions)
    notes = list(data.notes)
    if orphans:
        notes.append(f"{orphans} outcomes belong to no decision in the input (not counted)")
    stray = sum(1 for c in data.conversions or () if c.decision_id not in data.decisions)
    if stray:
        notes.append(f"{stray} conversions belong to no decision in the input (not counted)")
    multi = {cid for (cid, _v) in groups if sum(1 for k in groups if k[0] == cid) > 1}
    rows = [g.figures(known) for _k, g in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))]
    campaigns = [totals[cid].figures(known) for cid in sorted(totals)]
    for total in campaigns:
        total["has_variants"] = total["campaign_id"] in multi
    for r in rows + campaigns:
        r["lift_why"] = None if r["lift"] is not None else _lift_why(r, data, known)
    quiet = data.campaigns.quiet_hours if data.campaigns else None
    return {
        "source": data.source,
        "generated_at": iso_ms(int(datetime.now(UTC).timestamp() * 1000)),
        "known": known,
        "interval": "Newcombe hybrid score (method 10), 95%",
        "rows": rows,
        "campaigns": campaigns,
        "experiments": _experiments(rows, data, known),
        "samples": _samples(data),
        "lag_bins": [name for name, _top in LAG_BINS],
        "quiet_hours": None if quiet is None else [quiet.start.hour, quiet.end.hour],
        "trends": [_trend(cid, weeks) for cid, weeks in sorted(weekly.items())]
        if known["conversions"]
        else [],
        "notes": notes,
    }


def _last_text_before(data: ReportInput, user: str, at: int) -> DecisionRow | None:
    """The decision of the user's last text sent at or before ``at`` (what a STOP answers)."""
    best: tuple[int, str] | None = None
    for o in data.outcomes.values():
        if (
            o.user_id == user
            and o.status == "sent"
            and o.at <= at
            and o.decision_id in data.decisions
        ):
            if best is None or (o.at, o.decision_id) > best:
                best = (o.at, o.decision_id)
    return None if best is None else data.decisions[best[1]]


def _lift_why(r: dict[str, Any], data: ReportInput, known: dict[str, bool]) -> str:
    """Why a row has no lift, in words."""
    if not known["conversions"]:
        return "conversions unknown: no events to attribute them with"
    campaign = data.campaigns.get(r["campaign_id"]) if data.campaigns else None
    if campaign is not None and campaign.holdout <= 0:
        return "no holdout configured for this campaign"
    if not r["sent"]:
        return "no texts sent"
    if not r["holdout"]:
        return "no holdout decisions yet"
    return "not computable"


def _variant_kind(data: ReportInput, campaign_id: str) -> str:
    """``copy``, ``timing`` or ``copy and timing``: what the variants of a campaign change."""
    campaign = data.campaigns.get(campaign_id) if data.campaigns else None
    if campaign is None or len(campaign.variants) < 2:
        return "variants"
    first = campaign.variants[0]
    copy = any(v.message != first.message for v in campaign.variants)
    timing = any(v.trigger != first.trigger for v in campaign.variants)
    return (
        "copy and timing"
        if copy and timing
        else "copy"
        if copy
        else "timing"
        if timing
        else "variants"
    )


def _experiments(
    rows: list[dict[str, Any]], data: ReportInput, known: dict[str, bool]
) -> list[dict[str, Any]]:
    """Each A/B test: its variants side by side, the difference of the best two in conversion
    (and click) rate with its interval, and a verdict in words."""
    out = []
    by_campaign: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["variant"] not in (None, "*"):
            by_campaign[r["campaign_id"]].append(r)
    for cid, variants in sorted(by_campaign.items()):
        if len(variants) < 2:
            continue
        exp: dict[str, Any] = {"campaign_id": cid, "kind": _variant_kind(data, cid),
                               "variants": [v["variant"] for v in variants]}  # fmt: skip
        ranked = sorted(variants, key=lambda v: -(v["conversion_rate"] or 0.0))
        a, b = ranked[0], ranked[1]
        exp["conversion"] = exp["clicks"] = None
        if not known["conversions"]:
            exp["verdict"] = "conversions unknown: no events to attribute them with"
        elif not a["sent"] or not b["sent"]:
            exp["verdict"] = "a variant has no texts sent yet"
        else:
            d, low, high = newcombe(a["converted"], a["sent"], b["converted"], b["sent"])
            exp["conversion"] = {"leader": a["variant"], "other": b["variant"], "diff": d,
                                 "low": low, "high": high, "significant": low > 0}  # fmt: skip
            if known["clicks"]:
                ka, kb = a["clicked"] or 0, b["clicked"] or 0
                cd, cl, ch = newcombe(ka, a["sent"], kb, b["sent"])
                exp["clicks"] = {"diff": cd, "low": cl, "high": ch,
                                 "significant": cl > 0 or ch < 0}  # fmt: skip
            if low > 0:
                exp["verdict"] = f"{a['variant']} wins: converts {100 * d:.1f} pp better"
            else:
                exp["verdict"] = (
                    f"no clear winner yet: {a['variant']} leads by {100 * d:.1f} pp but the "
                    "interval includes 0 (more sends needed)"
                )
        out.append(exp)
    return out


SAMPLES_PER_VARIANT = 2


def _samples(data: ReportInput) -> list[dict[str, Any]]:
    """The first texts of each campaign and variant, exactly as they were sent."""
    if data.texts is None:
        return []
    taken: Counter[tuple[str, str | None]] = Counter()
    out = []
    sent = sorted(
        (o for o in data.outcomes.values() if o.status == "sent" and o.decision_id in data.texts),
        key=lambda o: (o.campaign_id, o.variant or "", o.at, o.decision_id),
    )
    for o in sent:
        key = (o.campaign_id, o.variant)
        if taken[key] < SAMPLES_PER_VARIANT:
            taken[key] += 1
            out.append({"campaign_id": o.campaign_id, "variant": o.variant,
                        "sent_at": iso_ms(o.at), "text": data.texts[o.decision_id]})  # fmt: skip
    return out


def _sort_key(key: tuple[str, str | None]) -> tuple[str, str]:
    return key[0], key[1] or ""


def _count(g: Group, d: DecisionRow, data: ReportInput, won: list[Conversion]) -> None:
    g.decisions += 1
    o = data.outcomes.get(d.decision_id)
    if o is None:
        g.not_sent["pending:"] += 1
        return
    if o.status == "sent":
        g.sent += 1
        if data.deliveries and data.deliveries.get(d.decision_id) == DELIVERED:
            g.delivered += 1
        if data.clicks and data.clicks.get(d.decision_id):
            g.clicked += 1
        if won:
            g.converted += 1
            g.conversions += len(won)
            g.revenue += sum((Decimal(c.revenue) for c in won if c.revenue), Decimal(0))
        if d.trigger_ts is not None:
            g.lags_ms.append(o.at - d.trigger_ts)
        g.by_hour[datetime.fromtimestamp(o.at / 1000, UTC).hour] += 1
        zone = data.zones.get(d.user_id) if data.zones else None
        if zone is not None:
            g.by_local_hour[datetime.fromtimestamp(o.at / 1000, _zone(zone)).hour] += 1
        return
    g.not_sent[f"{o.status}:{o.reason or ''}"] += 1
    if o.status == "suppressed" and o.reason == "holdout":
        g.holdout += 1
        if won:
            g.holdout_converted += 1
            g.holdout_revenue += sum((Decimal(c.revenue) for c in won if c.revenue), Decimal(0))


def _trend(campaign_id: str, weeks: dict[str, list[int]]) -> dict[str, Any]:
    """Weekly conversion rate of the texts sent each week; flags a drop of the latest week."""
    last = sorted(weeks.items())[-TREND_WEEKS:]
    series = [
        {"week": w, "sent": s, "converted": k, "rate": k / s if s else None} for w, (s, k) in last
    ]
    falling = False
    earlier_rate = None
    if len(last) >= 2:
        earlier_sent = sum(s for _w, (s, _k) in last[:-1])
        earlier_conv = sum(k for _w, (_s, k) in last[:-1])
        _w, (s_last, k_last) = last[-1]
        if earlier_sent and s_last:
            earlier_rate = earlier_conv / earlier_sent
            falling = k_last / s_last < earlier_rate * (1 - TREND_DROP)
    return {
        "campaign_id": campaign_id,
        "weeks": series,
        "earlier_rate": earlier_rate,
        "falling": falling,
        "enough_data": len(last) >= 2,
    }


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(row: dict[str, Any]) -> str:
    v = row["variant"]
    return row["campaign_id"] if v in (None, "*") else f"{row['campaign_id']} / {v}"


def _cmap(n: int) -> list[Any]:
    """``n`` colours from fast (green) to slow (red)."""
    from matplotlib import colormaps

    ramp = colormaps["RdYlGn_r"]
    return [ramp(i / max(1, n - 1)) for i in range(n)]


def plots(fig_data: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: funnel, conversion vs holdout with lift intervals, sends by hour, trends."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = fig_data["rows"]
    out: dict[str, str] = {}
    if not rows:
        return out
    labels = [_label(r) for r in rows]
    height = max(2.5, 0.45 * len(rows) + 1)

    fig = Figure(figsize=(9, height))
    ax = fig.add_subplot()
    stages = [("sent", "#4c72b0"), ("delivered", "#55a868"), ("clicked", "#dd8452"),
              ("converted", "#c44e52")]  # fmt: skip
    bar = 0.8 / len(stages)
    for i, (name, colour) in enumerate(stages):
        values = [r[name] or 0 for r in rows]
        ax.barh([y + i * bar for y in range(len(rows))], values, bar, label=name, color=colour)
    ax.set_yticks([y + 0.4 - bar / 2 for y in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("decisions")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Funnel per campaign and variant")
    out["funnel"] = _png(fig)

    lifted = [r for r in rows if r["lift"] is not None]
    if lifted:
        fig = Figure(figsize=(9, max(2.5, 0.45 * len(lifted) + 1)))
        ax = fig.add_subplot()
        ys = list(range(len(lifted)))
        diffs = [100 * r["lift"]["diff"] for r in lifted]
        lows = [100 * (r["lift"]["diff"] - r["lift"]["low"]) for r in lifted]
        highs = [100 * (r["lift"]["high"] - r["lift"]["diff"]) for r in lifted]
        ax.errorbar(diffs, ys, xerr=[lows, highs], fmt="o", capsize=4, color="#4c72b0")
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(ys, [_label(r) for r in lifted])
        ax.invert_yaxis()
        ax.set_xlabel("lift over holdout, percentage points (95% Newcombe interval)")
        ax.set_title("Lift over holdout")
        out["lift"] = _png(fig)

    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    bottom = [0] * 24
    for c in fig_data["campaigns"]:
        hours = c["sends_by_hour"]
        if any(hours):
            ax.bar(range(24), hours, bottom=bottom, label=c["campaign_id"])
            bottom = [b + h for b, h in zip(bottom, hours, strict=True)]
    ax.set_xticks(range(0, 24, 2))
    ax.set_xlabel("hour of day (UTC)")
    ax.set_ylabel("texts sent")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Sends by hour of day")
    if any(bottom):
        ax.legend(fontsize=7, ncol=2)
    out["hours"] = _png(fig)

    sent = [c for c in fig_data["campaigns"] if c["sent"]]
    if sent:
        fig = Figure(figsize=(9, max(2.5, 0.45 * len(sent) + 1.2)))
        ax = fig.add_subplot()
        names = fig_data["lag_bins"]
        left = [0.0] * len(sent)
        cmap = _cmap(len(names))
        for i, name in enumerate(names):
            shares = [100 * c["trigger_to_send_bins"][i] / c["sent"] for c in sent]
            ax.barh(range(len(sent)), shares, left=left, label=name, color=cmap[i])
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_yticks(range(len(sent)), [c["campaign_id"] for c in sent])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the campaign's texts, %")
        ax.set_title("Time from the action to the text")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        out["lags"] = _png(fig)

    local = [c for c in fig_data["campaigns"] if c.get("sends_by_local_hour")]
    if local and any(any(c["sends_by_local_hour"]) for c in local):
        fig = Figure(figsize=(9, 3.2))
        ax = fig.add_subplot()
        quiet = fig_data.get("quiet_hours")
        if quiet:
            start, end = quiet
            spans = [(start, end)] if start < end else [(start, 24), (0, end)]
            for i, (a, b) in enumerate(spans):
                ax.axvspan(a - 0.5, b - 0.5, color="#999999", alpha=0.15,
                           label="quiet hours" if i == 0 else None)  # fmt: skip
        bottom = [0] * 24
        for c in local:
            hours = c["sends_by_local_hour"]
            if any(hours):
                ax.bar(range(24), hours, bottom=bottom, label=c["campaign_id"])
                bottom = [b + h for b, h in zip(bottom, hours, strict=True)]
        ax.set_xticks(range(0, 24, 2))
        ax.set_xlim(-0.5, 23.5)
        ax.set_xlabel("hour of day in the recipient's time zone")
        ax.set_ylabel("texts sent")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Sends by the recipient's local hour")
        ax.legend(fontsize=7, ncol=2)
        out["local_hours"] = _png(fig)

    trends = [t for t in fig_data["trends"] if t["weeks"]]
    if trends:
        fig = Figure(figsize=(9, 3.2))
        ax = fig.add_subplot()
        for t in trends:
            weeks = [w for w in t["weeks"] if w["rate"] is not None]
            ax.plot(
                [w["week"] for w in weeks],
                [100 * w["rate"] for w in weeks],
                marker="o",
                label=t["campaign_id"] + (" (falling)" if t["falling"] else ""),
            )
        ax.set_ylabel("conversion rate, %")
        ax.set_xlabel("week of send (Monday, UTC)")
        ax.set_title("Weekly conversion rate")
        ax.legend(fontsize=7)
        out["trends"] = _png(fig)
    return out


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.total td{font-weight:bold;background:#fafafa}
tr.falling td{background:#fde8e8}.muted{color:#888}img{max-width:100%;margin:.5em 0}
td.text{max-width:40em;white-space:pre-wrap;font-family:ui-monospace,monospace}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: object) -> str:
    return "n/a" if x is None else str(x)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if abs(seconds) < 120:
        return f"{seconds:.0f}s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _cell(name: str, value: object, text: str, cls: str = "") -> str:
    raw = "" if value is None else (json.dumps(value) if not isinstance(value, str) else value)
    klass = f' class="{cls}"' if cls else ""
    return f'<td{klass} data-figure="{_e(name)}" data-value="{_e(raw)}">{_e(text)}</td>'


# Columns that exist only when their source does; when it is missing the page says why.
UNKNOWN_WHY = {
    "deliveries": "delivered: no delivery receipts in this input (the demo's outbox gateway "
    "sends none; with Vonage they come from the delivery webhook)",
    "clicks": "clicked: no events to find the link clicks in",
    "conversions": "converted, conversion rates, lift and revenue: no events to attribute "
    "conversions with",
    "opt_outs": "STOP replies: no opt_outs.jsonl in this input",
}
REASON_WORDS = {
    "holdout": "holdout (control group: decided, kept unsent on purpose)",
    "frequency_cap": "frequency cap (too many texts to this person recently)",
    "opted_out": "opted out (said STOP)",
    "no_consent": "no consent on file (unknown)",
    "no_contact": "no contact profile or phone number",
    "stale": "quiet hours would hold it past the campaign's max_defer",
    "quiet_hours": "quiet hours (dropped)",
    "converted": "converted before the text was due (exit)",
}


def _why(reason: str) -> str:
    status, _sep, why = reason.partition(":")
    return REASON_WORDS.get(why, f"{status}: {why}" if why else status)


def _lag_text(r: dict[str, Any]) -> str:
    if not r["sent"]:
        return "no texts sent"
    if r["median_trigger_to_send_s"] is None:
        return "unknown: no trigger event times"
    return _duration(r["median_trigger_to_send_s"])


def _rate(rate: float | None, n: int, empty: str) -> str:
    """A rate, or why there is none: ``empty`` when its denominator is 0, else "unknown"."""
    if not n:
        return empty
    return "unknown" if rate is None else _pct(rate)


def _lift_text(r: dict[str, Any]) -> str:
    lift = r["lift"]
    if lift is None:
        return str(r.get("lift_why") or "not computable")
    return f"{100 * lift['diff']:+.1f} pp [{100 * lift['low']:+.1f}, {100 * lift['high']:+.1f}]"


def _columns(known: dict[str, bool]) -> list[tuple[str, str, str]]:
    """(figure, header, source) of the campaign table; source "" = always known."""
    cols = [
        ("decisions", "decisions", ""), ("not_sent", "not sent (status: reason)", ""),
        ("sent", "sent", ""), ("delivered", "delivered", "deliveries"),
        ("clicked", "clicked", "clicks"), ("converted", "converted", "conversions"),
        ("conversion_rate", "conv. rate", "conversions"), ("holdout", "holdout", ""),
        ("holdout_rate", "holdout rate", "conversions"),
        ("lift", "lift over holdout [95% CI]", "conversions"),
        ("revenue", "revenue", "conversions"), ("stops", "STOP replies", "opt_outs"),
        ("median_trigger_to_send_s", "median trigger&rarr;send", ""),
    ]  # fmt: skip
    return [c for c in cols if not c[2] or known[c[2]]]


def _row_html(r: dict[str, Any], total: bool, known: dict[str, bool]) -> str:
    not_sent = ", ".join(f"{k.rstrip(':')}: {n}" for k, n in r["not_sent"].items()) or "-"
    variant = "all" if total else (r["variant"] or "-")
    texts = {
        "not_sent": not_sent,
        "conversion_rate": _rate(r["conversion_rate"], r["sent"], "no texts sent"),
        "holdout_rate": _rate(r["holdout_rate"], r["holdout"], "no holdout"),
        "lift": _lift_text(r),
        "median_trigger_to_send_s": _lag_text(r),
    }
    cells = [f'<td class="l">{_e(r["campaign_id"])}</td>', f'<td class="l">{_e(variant)}</td>']
    for name, _head, _src in _columns(known):
        cls = "l" if name in ("not_sent", "lift") else ""
        cells.append(_cell(name, r[name], texts.get(name, _num(r[name])), cls))
    attrs = (
        f'data-campaign="{_e(r["campaign_id"])}" '
        f'data-variant="{_e("*" if total else (r["variant"] or ""))}"'
    )
    return f'<tr class="{"total" if total else ""}" {attrs}>{"".join(cells)}</tr>'


def _img(images: dict[str, str], name: str, alt: str) -> str:
    data = images.get(name)
    return (
        f'<img id="chart-{name}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        if data
        else ""
    )


def _lift_table(fig_data: dict[str, Any]) -> str:
    rows = []
    for c in fig_data["campaigns"]:
        lift = c["lift"]
        if lift is None:
            verdict = str(c.get("lift_why") or "not computable")
        elif lift["significant"]:
            verdict = "significant: the interval excludes 0" + (
                "" if lift["diff"] > 0 else " (the text does worse than no text)"
            )
        else:
            verdict = "not significant: the interval includes 0"
        rows.append(
            f'<tr data-campaign="{_e(c["campaign_id"])}" '
            f'data-has-lift="{str(lift is not None).lower()}">'
            f"<td class=l>{_e(c['campaign_id'])}</td><td>{c['sent']}</td>"
            f"<td>{_e(_rate(c['conversion_rate'], c['sent'], 'no texts sent'))}</td>"
            f"<td>{c['holdout']}</td>"
            f"<td>{_e(_rate(c['holdout_rate'], c['holdout'], 'no holdout'))}</td>"
            f'<td class=l data-figure="lift">{_e(_lift_text(c))}</td>'
            f"<td class=l>{_e(verdict)}</td></tr>"
        )
    return (
        '<table id="lift"><thead><tr><th class=l>campaign</th><th>sent</th><th>conv. rate '
        "with text</th><th>holdout</th><th>conv. rate without text (holdout)</th>"
        "<th class=l>lift [95% CI]</th><th class=l>verdict</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _lag_table(fig_data: dict[str, Any]) -> str:
    rows = []
    for c in fig_data["campaigns"]:
        q = c["trigger_to_send_s"]
        if q is None:
            cells = '<td class=l colspan="6">no texts sent</td>'
        else:
            cells = "".join(
                f"<td>{_duration(q[k])}</td>" for k in ("p10", "p25", "p50", "p75", "p90", "max")
            )
        rows.append(
            f'<tr data-campaign="{_e(c["campaign_id"])}">'
            f"<td class=l>{_e(c['campaign_id'])}</td>{cells}</tr>"
        )
    return (
        '<table id="lags"><thead><tr><th class=l>campaign</th><th>10%</th><th>25%</th>'
        "<th>median</th><th>75%</th><th>90%</th><th>slowest</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _experiments_html(fig_data: dict[str, Any]) -> str:
    exps = fig_data["experiments"]
    if not exps:
        return "<p>No campaign in this input has variants: there is no A/B test to compare.</p>"
    rows_by = {(r["campaign_id"], r["variant"]): r for r in fig_data["rows"]}
    out = []
    for x in exps:
        cells = []
        for v in x["variants"]:
            r = rows_by[(x["campaign_id"], v)]
            click = _rate(r["click_rate"], r["sent"], "-")
            conv = _rate(r["conversion_rate"], r["sent"], "-")
            cells.append(
                f"<b>{_e(v)}</b>: {r['sent']} sent, clicked {_e(click)}, converted {_e(conv)}, "
                f"median trigger&rarr;send {_e(_lag_text(r))}"
            )
        conv = x["conversion"]
        diff = (
            f"{_e(conv['leader'])} &minus; {_e(conv['other'])}: {100 * conv['diff']:+.1f} pp "
            f"[{100 * conv['low']:+.1f}, {100 * conv['high']:+.1f}]"
            if conv
            else "-"
        )
        out.append(
            f'<tr data-campaign="{_e(x["campaign_id"])}" data-kind="{_e(x["kind"])}">'
            f"<td class=l>{_e(x['campaign_id'])}</td><td class=l>{_e(x['kind'])}</td>"
            f"<td class=l>{'<br>'.join(cells)}</td><td class=l>{diff}</td>"
            f"<td class=l>{_e(x['verdict'])}</td></tr>"
        )
    return (
        '<table id="experiments"><thead><tr><th class=l>campaign</th><th class=l>tests</th>'
        "<th class=l>variants</th><th class=l>conversion difference [95% CI]</th>"
        f"<th class=l>verdict</th></tr></thead><tbody>{''.join(out)}</tbody></table>"
    )


def _suppressed_html(fig_data: dict[str, Any]) -> str:
    rows = []
    for c in fig_data["campaigns"]:
        reasons = sorted(c["not_sent"].items(), key=lambda kv: -kv[1])
        if not c["decisions"]:
            continue
        text = (
            "; ".join(f"{_why(k)}: {n}" for k, n in reasons) or "nothing: every decision was sent"
        )
        share = 1 - c["sent"] / c["decisions"]
        rows.append(
            f'<tr data-campaign="{_e(c["campaign_id"])}"><td class=l>{_e(c["campaign_id"])}</td>'
            f"<td>{c['decisions']}</td><td>{_pct(share)}</td><td class=l>{_e(text)}</td></tr>"
        )
    return (
        '<table id="suppressed"><thead><tr><th class=l>campaign</th><th>decisions</th>'
        "<th>not sent</th><th class=l>why</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _samples_html(fig_data: dict[str, Any]) -> str:
    if not fig_data["samples"]:
        return "<p>No texts to show: this input has no outbox (the texts as they were sent).</p>"
    rows = "".join(
        f'<tr data-campaign="{_e(x["campaign_id"])}"><td class=l>{_e(x["campaign_id"])}</td>'
        f"<td class=l>{_e(x['variant'] or '-')}</td><td class=l>{_e(x['sent_at'])}</td>"
        f'<td class="l text">{_e(x["text"])}</td></tr>'
        for x in fig_data["samples"]
    )
    return (
        '<table id="samples"><thead><tr><th class=l>campaign</th><th class=l>variant</th>'
        "<th class=l>sent (UTC)</th><th class=l>text</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _trends_html(fig_data: dict[str, Any]) -> str:
    if not fig_data["known"]["conversions"]:
        return "<p>Cannot tell: no events to attribute conversions with.</p>"
    trend_rows = []
    for t in fig_data["trends"]:
        weeks = ", ".join(
            f"{w['week']}: {w['converted']}/{w['sent']} ({_pct(w['rate'])})" for w in t["weeks"]
        )
        if t["falling"]:
            flag = "FALLING"
        elif t["enough_data"]:
            flag = "ok"
        else:
            flag = (
                "too early to tell: sends in one week only; the flag compares the latest week "
                "with earlier ones"
            )
        earlier = _pct(t["earlier_rate"]) if t["earlier_rate"] is not None else "no earlier week"
        klass = "falling" if t["falling"] else ""
        trend_rows.append(
            f'<tr class="{klass}" data-campaign="{_e(t["campaign_id"])}"'
            f' data-falling="{str(t["falling"]).lower()}"><td class=l>{_e(t["campaign_id"])}</td>'
            f"<td class=l>{_e(weeks)}</td><td>{_e(earlier)}</td>"
            f"<td class=l>{_e(flag)}</td></tr>"
        )
    return (
        f'<table id="trends"><thead><tr><th class=l>campaign</th><th class=l>last {TREND_WEEKS} '
        "weeks (converted/sent)</th><th>earlier weeks' rate</th><th class=l>flag</th></tr></thead>"
        f"<tbody>{''.join(trend_rows)}</tbody></table>"
        f'<p class="muted">Flagged FALLING when the latest week\'s conversion rate is at least '
        f"{int(TREND_DROP * 100)}% below the pooled rate of the earlier weeks shown.</p>"
    )


def render_html(fig_data: dict[str, Any], images: dict[str, str]) -> str:
    """The page. Every number shown is also in the embedded JSON block (id ``DATA_ID``)."""
    known = fig_data["known"]
    cols = _columns(known)
    head = (
        "<tr><th class=l>campaign</th><th class=l>variant</th>"
        + "".join(
            f"<th{' class=l' if n in ('not_sent', 'lift') else ''}>{h}</th>" for n, h, _s in cols
        )
        + "</tr>"
    )
    body = []
    for c in fig_data["campaigns"]:
        cid = c["campaign_id"]
        body += [_row_html(r, False, known) for r in fig_data["rows"] if r["campaign_id"] == cid]
        if c["has_variants"]:
            body.append(_row_html(c, True, known))
    missing = [
        UNKNOWN_WHY[k] for k in ("deliveries", "clicks", "conversions", "opt_outs") if not known[k]
    ]
    missing_html = (
        "<p>Not in this table, and why: " + "; ".join(_e(m) for m in missing) + ".</p>"
        if missing
        else ""
    )
    quiet = fig_data["quiet_hours"]
    quiet_text = f"{quiet[0]:02d}:00&ndash;{quiet[1]:02d}:00" if quiet else "none configured"
    local = (
        _img(images, "local_hours", "sends by recipient's local hour")
        if known["zones"]
        else "<p>The recipients' time zones are not in this input (zones.jsonl), so sends are "
        "shown by UTC hour only.</p>"
    )
    notes = "".join(f"<li>{_e(n)}</li>" for n in fig_data["notes"])
    blob = json.dumps(fig_data, sort_keys=True).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>NudgeFlow report</title>
<style>{_CSS}</style></head><body>
<h1>NudgeFlow report</h1>
<p class="muted">Source: {_e(fig_data["source"])} &middot;
generated {_e(fig_data["generated_at"])}</p>
<h2>Does a text convert better than no text?</h2>
{_lift_table(fig_data)}
<p class="muted">Conversion rate = sent texts with at least one conversion attributed (last touch:
within the campaign's after_send window of the text, or after_click of a click on its link) /
sent texts. The holdout (never sent, decided before consent and caps are checked) is attributed
the same way against its suppressed decision. Lift = conversion rate &minus; holdout rate, in
percentage points, with a 95% {_e(fig_data["interval"].split(",")[0])} interval; significant
when the interval excludes 0.</p>
{_img(images, "lift", "lift over holdout")}
<h2>Campaigns and variants</h2>
<table id="campaigns"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>
{missing_html}
{_img(images, "funnel", "funnel")}
<h2>How fast the text followed the action</h2>
<p class="muted">Time from the event that made the decision to the send (quiet hours and caps
included), as a distribution per campaign.</p>
{_lag_table(fig_data)}
{_img(images, "lags", "trigger to send distribution")}
<h2>Which copy and which timing won</h2>
{_experiments_html(fig_data)}
<h2>When texts arrive: sends by the recipient's local hour</h2>
<p class="muted">Quiet hours (recipient's local time): {quiet_text}, shaded.</p>
{local}
{_img(images, "hours", "sends by UTC hour")}
<h2>What was not sent, and why</h2>
{_suppressed_html(fig_data)}
<h2>Texts as they were sent</h2>
{_samples_html(fig_data)}
<h2>Triggers losing value</h2>
{_trends_html(fig_data)}
{_img(images, "trends", "weekly conversion rate")}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<script type="application/json" id="{DATA_ID}">{blob}</script>
</body></html>
"""


def build(data: ReportInput) -> str:
    fig_data = compute(data)
    return render_html(fig_data, plots(fig_data))


def read_report_data(page: str) -> dict[str, Any]:
    """The figures embedded in a report page (for tools and tests)."""
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    start = page.index(start_tag) + len(start_tag)
    end = page.index("</script>", start)
    result: dict[str, Any] = json.loads(page[start:end])
    return result


def write_conversions(path: Path, conversions: Iterable[Conversion]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for c in conversions:
            fh.write(json.dumps(c.to_json()) + "\n")


def write_dir_report(
    directory: Path, events: Path | None = None, campaigns: Path | None = None
) -> Path:
    """``DIR/conversions.jsonl`` and ``DIR/report.html`` from a demo directory; returns the page."""
    data, _events = load_dir(directory, events, campaigns)
    if data.conversions is not None:
        write_conversions(directory / "conversions.jsonl", data.conversions)
    out = directory / "report.html"
    out.write_text(build(data), encoding="utf-8")
    return out


def write_dir_report_with_figures(directory: Path) -> tuple[Path, dict[str, Any]]:
    """``write_dir_report`` that also returns the figures shown (the demo's summary)."""
    data, _events = load_dir(directory)
    if data.conversions is not None:
        write_conversions(directory / "conversions.jsonl", data.conversions)
    fig_data = compute(data)
    out = directory / "report.html"
    out.write_text(render_html(fig_data, plots(fig_data)), encoding="utf-8")
    return out, fig_data


def write_demo_report(directory: Path, events: Path, campaigns: Path) -> Path:
    """What ``nudgeflow demo`` adds to its directory: the input (events as canonical JSON Lines,
    whatever their format; the campaign file), so ``nudgeflow report --from DIR`` needs nothing
    else, then ``conversions.jsonl`` and ``report.html``."""
    rows = list(read_events(events, LineErrors(str(events), echo=None)))  # read before writing
    with (directory / "events.jsonl").open("w", encoding="utf-8") as fh:
        for e in rows:
            fh.write(json.dumps(e.to_json()) + "\n")
    target = directory / "campaigns.yaml"
    if campaigns.resolve() != target.resolve():
        target.write_bytes(campaigns.read_bytes())
    return write_dir_report(directory)


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from", dest="source", type=Path, metavar="DIR", help="a `nudgeflow demo` directory"
    )
    src.add_argument(
        "--from-kafka", action="store_true", help="read the topics to their current end"
    )
    parser.add_argument(
        "--events", type=Path, help="events for clicks and conversions (default DIR/events.jsonl)"
    )
    parser.add_argument(
        "--campaigns", type=Path, help="campaign file (default DIR/campaigns.yaml, else settings)"
    )
    parser.add_argument(
        "--out", type=Path, help="HTML file to write (default DIR/report.html, else report.html)"
    )
    parser.add_argument(
        "--conversions-out", type=Path, help="also write the attributed conversions (JSON Lines)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.from_kafka:
            from processors.settings import Settings

            settings = Settings.load()
            if args.campaigns is not None:
                settings = settings.model_copy(update={"campaigns_file": args.campaigns})
            data = load_kafka(settings)
            out = args.out or Path("report.html")
        else:
            data, _events = load_dir(args.source, args.events, args.campaigns)
            out = args.out or args.source / "report.html"
        page = build(data)
    except (ReportError, CampaignError) as exc:
        print(f"nudgeflow report: {exc}", file=sys.stderr)
        return 2
    out.write_text(page, encoding="utf-8")
    if args.conversions_out is not None and data.conversions is not None:
        write_conversions(args.conversions_out, data.conversions)
    print(f"report: {out}")
    return 0
