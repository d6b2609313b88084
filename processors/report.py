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
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

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
    return data, event_list


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

    from processors.control import is_control
    from processors.core.decision import Decision, DecisionCancelled
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

    def figures(self, known: dict[str, bool]) -> dict[str, Any]:
        rate = self.converted / self.sent if self.sent else None
        holdout_rate = self.holdout_converted / self.holdout if self.holdout else None
        lift = None
        if self.sent and self.holdout and known["conversions"]:
            d, low, high = newcombe(self.converted, self.sent, self.holdout_converted, self.holdout)
            lift = {"diff": d, "low": low, "high": high}
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
            "sends_by_hour": list(self.by_hour),
        }


def _week(ms: int) -> str:
    day = datetime.fromtimestamp(ms / 1000, UTC).date()
    return (day - timedelta(days=day.weekday())).isoformat()  # the week's Monday (UTC)


def compute(data: ReportInput) -> dict[str, Any]:
    """All figures of the report as plain JSON-able data (the page renders this)."""
    known = {
        "conversions": data.conversions is not None,
        "clicks": data.clicks is not None,
        "deliveries": data.deliveries is not None,
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
    return {
        "source": data.source,
        "generated_at": iso_ms(int(datetime.now(UTC).timestamp() * 1000)),
        "known": known,
        "interval": "Newcombe hybrid score (method 10), 95%",
        "rows": rows,
        "campaigns": campaigns,
        "trends": [_trend(cid, weeks) for cid, weeks in sorted(weekly.items())]
        if known["conversions"]
        else [],
        "notes": notes,
    }


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


def _row_html(r: dict[str, Any], total: bool) -> str:
    lift = r["lift"]
    lift_text = (
        "n/a"
        if lift is None
        else f"{100 * lift['diff']:+.1f} pp [{100 * lift['low']:+.1f}, {100 * lift['high']:+.1f}]"
    )
    not_sent = ", ".join(f"{k.rstrip(':')}: {n}" for k, n in r["not_sent"].items()) or "-"
    variant = "all" if total else (r["variant"] or "-")
    cells = [
        f'<td class="l">{_e(r["campaign_id"])}</td>',
        f'<td class="l">{_e(variant)}</td>',
        _cell("decisions", r["decisions"], str(r["decisions"])),
        _cell("not_sent", r["not_sent"], not_sent, "l"),
        _cell("sent", r["sent"], str(r["sent"])),
        _cell("delivered", r["delivered"], _num(r["delivered"])),
        _cell("clicked", r["clicked"], _num(r["clicked"])),
        _cell("converted", r["converted"], _num(r["converted"])),
        _cell("conversion_rate", r["conversion_rate"], _pct(r["conversion_rate"])),
        _cell("holdout", r["holdout"], str(r["holdout"])),
        _cell("holdout_rate", r["holdout_rate"], _pct(r["holdout_rate"])),
        _cell("lift", lift, lift_text),
        _cell("revenue", r["revenue"], _num(r["revenue"])),
        _cell(
            "median_trigger_to_send_s",
            r["median_trigger_to_send_s"],
            _duration(r["median_trigger_to_send_s"]),
        ),
    ]
    attrs = (
        f'data-campaign="{_e(r["campaign_id"])}" '
        f'data-variant="{_e("*" if total else (r["variant"] or ""))}"'
    )
    return f'<tr class="{"total" if total else ""}" {attrs}>{"".join(cells)}</tr>'


def render_html(fig_data: dict[str, Any], images: dict[str, str]) -> str:
    """The page. Every number shown is also in the embedded JSON block (id ``DATA_ID``)."""
    head = (
        "<tr><th class=l>campaign</th><th class=l>variant</th><th>decisions</th>"
        "<th class=l>not sent (status: reason)</th><th>sent</th><th>delivered</th>"
        "<th>clicked</th><th>converted</th><th>conv. rate</th><th>holdout</th>"
        "<th>holdout rate</th><th>lift over holdout [95% CI]</th><th>revenue</th>"
        "<th>median trigger&rarr;send</th></tr>"
    )
    body = []
    for c in fig_data["campaigns"]:
        cid = c["campaign_id"]
        body += [_row_html(r, False) for r in fig_data["rows"] if r["campaign_id"] == cid]
        if c["has_variants"]:
            body.append(_row_html(c, True))
    trend_rows = []
    for t in fig_data["trends"]:
        weeks = ", ".join(
            f"{w['week']}: {w['converted']}/{w['sent']} ({_pct(w['rate'])})" for w in t["weeks"]
        )
        flag = "FALLING" if t["falling"] else ("ok" if t["enough_data"] else "too few weeks")
        klass = "falling" if t["falling"] else ""
        trend_rows.append(
            f'<tr class="{klass}" data-campaign="{_e(t["campaign_id"])}"'
            f' data-falling="{str(t["falling"]).lower()}"><td class=l>{_e(t["campaign_id"])}</td>'
            f"<td class=l>{_e(weeks)}</td><td>{_pct(t['earlier_rate'])}</td>"
            f"<td class=l>{flag}</td></tr>"
        )
    imgs = "".join(
        f'<img alt="{_e(name)}" src="data:image/png;base64,{data}">'
        for name, data in images.items()
    )
    notes = "".join(f"<li>{_e(n)}</li>" for n in fig_data["notes"])
    blob = json.dumps(fig_data, sort_keys=True).replace("</", "<\\/")
    known = fig_data["known"]
    missing = [k for k, v in known.items() if not v]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>NudgeFlow report</title>
<style>{_CSS}</style></head><body>
<h1>NudgeFlow report</h1>
<p class="muted">Source: {_e(fig_data["source"])} &middot; generated {_e(fig_data["generated_at"])}
{"&middot; unknown here: " + _e(", ".join(missing)) if missing else ""}</p>
<h2>Campaigns and variants</h2>
<table id="campaigns"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>
<p class="muted">Conversion rate = sent texts with at least one conversion attributed (last touch:
within the campaign's after_send window of the text, or after_click of a click on its link) /
sent texts. The holdout (never sent, decided before consent and caps are checked) is attributed
the same way against its suppressed decision. Lift = conversion rate &minus; holdout rate, in
percentage points, with a 95% {_e(fig_data["interval"].split(",")[0])} interval.
Trigger&rarr;send is the time from the event that made the decision to the send; hours are UTC.</p>
{imgs}
<h2>Triggers losing value</h2>
<table id="trends"><thead><tr><th class=l>campaign</th><th class=l>last {TREND_WEEKS} weeks
(converted/sent)</th><th>earlier weeks' rate</th><th class=l>flag</th></tr></thead>
<tbody>{"".join(trend_rows)}</tbody></table>
<p class="muted">Flagged FALLING when the latest week's conversion rate is at least
{int(TREND_DROP * 100)}% below the pooled rate of the earlier weeks shown.</p>
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
