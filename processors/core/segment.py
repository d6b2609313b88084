"""Journey-stage segmentation from the stream itself: purchase count, first and last seen, last
purchase, events in the last 24 h and intent in the current session. Evaluated at fire time and
written into the decision, so backtest and live agree on who is a first-time buyer."""

from __future__ import annotations

from typing import Any

from processors.core.campaign import Audience
from processors.core.events import ClickEvent

PURCHASE_EVENTS = frozenset({"purchase", "order_completed"})
# Intent events: a shopper or lead moving toward a conversion in this session.
INTENT_EVENTS = frozenset(
    {
        "add_to_cart",
        "checkout_start",
        "checkout_step",
        "product_view",
        "pricing_view",
        "form_start",
        "booking_start",
    }
)
HIGH_INTENT_MIN = 2
DAY_MS = 86_400_000
HOUR_MS = 3_600_000

Facts = dict[str, Any]


def new_facts() -> Facts:
    # pc purchases, fs first seen, ls last seen, lp last purchase, r [[hour, count], ...] for
    # the last 24 h (hour buckets keep the state small), sid session, si intent in that session
    return {"pc": 0, "fs": None, "ls": None, "lp": None, "r": [], "sid": None, "si": 0}


def observe(facts: Facts, ev: ClickEvent) -> int | None:
    """Fold one event into the facts; returns the inactivity gap before it (None if first)."""
    ts = ev.ts
    last = facts["ls"]
    if last is None:
        gap = None
        facts["ls"] = ts
    else:
        gap = ts - last
        if ts > last:
            facts["ls"] = ts
    if facts["fs"] is None:
        facts["fs"] = ts
    event_type = ev.event_type
    if event_type in PURCHASE_EVENTS:
        facts["pc"] += 1
        facts["lp"] = ts
    hour = ts // HOUR_MS
    recent = facts["r"]
    if recent and recent[-1][0] == hour:
        recent[-1][1] += 1
    else:
        if recent and recent[0][0] <= hour - 24:
            recent = facts["r"] = [b for b in recent if b[0] > hour - 24]
        recent.append([hour, 1])
    if ev.session_id != facts["sid"]:
        facts["sid"] = ev.session_id
        facts["si"] = 0
    if event_type in INTENT_EVENTS:
        facts["si"] += 1
    return gap


def lifecycle_stage(facts: Facts) -> str:
    if facts["pc"] == 0:
        return "prospect"
    return "first_time_buyer" if facts["pc"] == 1 else "repeat_customer"


def events_last_24h(facts: Facts, at_ms: int) -> int:
    """Events in the 24 hours before ``at_ms``, to hour granularity."""
    hour = at_ms // HOUR_MS
    return sum(n for h, n in facts["r"] if hour - 24 < h <= hour)


def matches(audience: Audience | None, facts: Facts, gap_ms: int | None) -> bool:
    """Does the user, as of fire time, belong to the campaign's audience?

    ``inactive`` (with ``days``) means the triggering event came after at least that many days
    without activity (a returning visitor); ``high_intent`` means at least two intent events in
    the current session.
    """
    if audience is None or audience.stage is None:
        return True
    stage = audience.stage
    if stage == "inactive":
        return gap_ms is not None and gap_ms >= (audience.days or 0) * DAY_MS
    if stage == "high_intent":
        return facts["si"] >= HIGH_INTENT_MIN
    return lifecycle_stage(facts) == stage
