"""The report's figures as plain JSON-able data, per campaign and variant."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from processors.core.attribution import (
    Conversion,
)
from processors.core.events import iso_ms
from processors.report.inputs import DELIVERED, DecisionRow, ReportInput
from processors.report.stats import newcombe

TREND_WEEKS = 4  # the "last weeks" the decline table looks at
TREND_DROP = 0.2  # flag when the latest week's rate is >= 20 % below the earlier weeks'


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
