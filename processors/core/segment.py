"""Journey-stage segmentation from the stream itself: purchase count, first and last seen, last
purchase, events in the last 24 h and intent in the current session. Evaluated at fire time and
written into the decision, so backtest and live agree on who is a first-time buyer."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(slots=True, init=False)
class HourCount:
    """Events in one hour (epoch hours). Never changed once made: :meth:`Facts.clone` shares
    them."""

    hour: int
    count: int

    def __init__(self, hour: int, count: int) -> None:
        self.hour = hour
        self.count = count


@dataclass(slots=True, init=False)
class Facts:
    """The journey facts of one user, folded from every event (:func:`observe`)."""

    purchases: int = 0
    first_seen: int | None = None
    last_seen: int | None = None
    last_purchase: int | None = None
    recent: list[HourCount] = field(default_factory=list)  # the last 24 h, oldest first
    session_id: str | None = None
    session_intent: int = 0  # intent events in that session

    def __init__(
        self,
        purchases: int = 0,
        first_seen: int | None = None,
        last_seen: int | None = None,
        last_purchase: int | None = None,
        recent: list[HourCount] | None = None,
        session_id: str | None = None,
        session_intent: int = 0,
    ) -> None:
        self.purchases = purchases
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.last_purchase = last_purchase
        self.recent = [] if recent is None else recent
        self.session_id = session_id
        self.session_intent = session_intent

    def clone(self) -> Facts:
        return Facts(
            self.purchases, self.first_seen, self.last_seen, self.last_purchase,
            list(self.recent), self.session_id,
            self.session_intent,
        )  # fmt: skip


def new_facts() -> Facts:
    return Facts()


def observe(facts: Facts, ev: ClickEvent) -> int | None:
    """Fold one event into the facts; returns the inactivity gap before it (None if first)."""
    ts = ev.ts
    last = facts.last_seen
    gap: int | None
    if last is None:
        gap = None
        facts.last_seen = ts
    else:
        gap = ts - last
        if ts > last:
            facts.last_seen = ts
    if facts.first_seen is None:
        facts.first_seen = ts
    event_type = ev.event_type
    if event_type in PURCHASE_EVENTS:
        facts.purchases += 1
        facts.last_purchase = ts
    hour = ts // HOUR_MS
    recent = facts.recent
    if recent and recent[-1].hour == hour:
        recent[-1] = HourCount(hour, recent[-1].count + 1)  # never changed in place: shared
    else:
        if recent and recent[0].hour <= hour - 24:
            recent = facts.recent = [b for b in recent if b.hour > hour - 24]
        recent.append(HourCount(hour, 1))
    if ev.session_id != facts.session_id:
        facts.session_id = ev.session_id
        facts.session_intent = 0
    if event_type in INTENT_EVENTS:
        facts.session_intent += 1
    return gap


def lifecycle_stage(facts: Facts) -> str:
    purchases = facts.purchases
    if purchases == 0:
        return "prospect"
    return "first_time_buyer" if purchases == 1 else "repeat_customer"


def events_last_24h(facts: Facts, at_ms: int) -> int:
    """Events in the 24 hours before ``at_ms``, to hour granularity."""
    hour = at_ms // HOUR_MS
    return sum(b.count for b in facts.recent if hour - 24 < b.hour <= hour)


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
        return facts.session_intent >= HIGH_INTENT_MIN
    return lifecycle_stage(facts) == stage
