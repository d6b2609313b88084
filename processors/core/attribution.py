"""Last-touch attribution: which text (if any) earned a conversion.

A *touch* is a sent text, or a held-out decision (the control group: decided, never sent; its
touch time is when it was suppressed, i.e. when the text would have gone). A conversion event of
a type the touch's campaign counts (``conversion:``, default the trigger's cancel events or
``purchase``) is *covered* by a touch when it happens within ``after_send`` (24 h) of it, or
within ``after_click`` (5 d) of a click on its link. Of the covering touches, the most recent one
gets the conversion (last touch); ties go to the larger decision id so every path agrees. The
same rule credits holdout members, so the holdout's conversion rate is the baseline for lift.

One function, :func:`attribute`, decides; the offline report (:func:`attribute_all`) and the
live shell (:class:`UserState`, state kept in Redis) both call it. Time is always passed in.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from processors.core.campaign import (
    DEFAULT_AFTER_CLICK_MS,
    DEFAULT_AFTER_SEND_MS,
    DEFAULT_CONVERSION,
    Campaign,
    CampaignSet,
)
from processors.core.events import ClickEvent, EventError, iso_ms, parse_ts
from processors.core.outcome import SmsOutcome

CLICK_EVENT = "sms_link_click"
"""Clickstream event type the webhook service emits for a tracked-link click."""
HOLDOUT_REASON = "holdout"
VALUE_PROPERTY = "value"
MAX_TOUCHES = 200  # per user: bounds the state of a user who gets texts for months
MAX_CLICKS = 200
MAX_PENDING = 1_000
MAX_SEEN = 5_000


class AttributionError(ValueError):
    """A conversion record or stored attribution state is malformed."""


@dataclass(frozen=True, slots=True)
class Touch:
    """A text that went out (or a held-out decision) that later conversions can be credited to."""

    decision_id: str
    campaign_id: str
    user_id: str
    at: int  # epoch ms: sent (or suppressed as holdout)
    variant: str | None = None
    holdout: bool = False

    @classmethod
    def from_outcome(cls, outcome: SmsOutcome) -> Touch | None:
        """``sent`` and ``suppressed: holdout`` outcomes are touches; every other outcome is not."""
        if outcome.status == "sent":
            holdout = False
        elif outcome.status == "suppressed" and outcome.reason == HOLDOUT_REASON:
            holdout = True
        else:
            return None
        return cls(
            outcome.decision_id,
            outcome.campaign_id,
            outcome.user_id,
            outcome.at,
            outcome.variant,
            holdout,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "campaign_id": self.campaign_id,
            "user_id": self.user_id,
            "at": self.at,
            "variant": self.variant,
            "holdout": self.holdout,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Touch:
        return cls(
            str(d["decision_id"]),
            str(d["campaign_id"]),
            str(d["user_id"]),
            int(d["at"]),
            d.get("variant"),
            bool(d.get("holdout", False)),
        )


@dataclass(frozen=True, slots=True)
class Click:
    """A click on a tracked link. ``decision_id`` None: the link did not say which text it was
    in; the click then counts for the user's most recent sent text before it."""

    user_id: str
    ts: int
    event_id: str
    decision_id: str | None = None

    @classmethod
    def from_event(cls, event: ClickEvent) -> Click | None:
        if event.event_type != CLICK_EVENT:
            return None
        return cls(event.user_id, event.ts, event.event_id, event.properties.get("decision_id"))

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "ts": self.ts,
            "event_id": self.event_id,
            "decision_id": self.decision_id,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Click:
        return cls(str(d["user_id"]), int(d["ts"]), str(d["event_id"]), d.get("decision_id"))


@dataclass(frozen=True, slots=True)
class Conversion:
    """One attributed conversion (topic ``sms-conversions``, ``conversions.jsonl``)."""

    conversion_id: str
    event_id: str
    event_type: str
    user_id: str
    ts: int
    decision_id: str
    campaign_id: str
    touch_at: int
    via: str  # "send" or "click": which window covered the conversion
    variant: str | None = None
    holdout: bool = False
    revenue: str | None = None  # decimal string: no float rounding of money

    def to_record(self) -> dict[str, Any]:
        """The Avro ``Conversion`` dict (times as epoch ms)."""
        return {
            "conversion_id": self.conversion_id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "user_id": self.user_id,
            "ts": self.ts,
            "decision_id": self.decision_id,
            "campaign_id": self.campaign_id,
            "variant": self.variant,
            "holdout": self.holdout,
            "touch_at": self.touch_at,
            "via": self.via,
            "revenue": self.revenue,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Conversion:
        """From an Avro record or a ``conversions.jsonl`` line (ISO or epoch-ms times)."""
        try:
            return cls(
                conversion_id=str(r["conversion_id"]),
                event_id=str(r["event_id"]),
                event_type=str(r["event_type"]),
                user_id=str(r["user_id"]),
                ts=parse_ts(r["ts"]),
                decision_id=str(r["decision_id"]),
                campaign_id=str(r["campaign_id"]),
                touch_at=parse_ts(r["touch_at"]),
                via=str(r["via"]),
                variant=r.get("variant"),
                holdout=bool(r.get("holdout", False)),
                revenue=None if r.get("revenue") is None else str(r["revenue"]),
            )
        except (KeyError, TypeError, EventError) as exc:
            raise AttributionError(f"invalid Conversion record: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The ``conversions.jsonl`` line (ISO-8601 UTC times)."""
        return {**self.to_record(), "ts": iso_ms(self.ts), "touch_at": iso_ms(self.touch_at)}


def conversion_id(user_id: str, event_id: str) -> str:
    """Deterministic: a redelivered or replayed event gives the same id (consumers dedupe)."""
    raw = f"{user_id}\x1f{event_id}".encode()
    return "cv-" + hashlib.blake2b(raw, digest_size=16).hexdigest()[:31]


def revenue_of(event: ClickEvent) -> tuple[str | None, bool]:
    """The event's ``value`` property as a decimal string, and whether it was unreadable.

    A missing value is simply no revenue; a present but unreadable one (text, NaN, negative) is
    reported so the conversion still counts but the bad value is not silently taken as 0.
    """
    raw = event.properties.get(VALUE_PROPERTY)
    if raw is None or raw.strip() == "":
        return None, False
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        return None, True
    if not value.is_finite() or value < 0:
        return None, True
    return format(value, "f"), False


@dataclass(frozen=True, slots=True)
class Rule:
    conversion_events: frozenset[str]
    after_send_ms: int = DEFAULT_AFTER_SEND_MS
    after_click_ms: int = DEFAULT_AFTER_CLICK_MS


DEFAULT_RULE = Rule(DEFAULT_CONVERSION)


class Rules:
    """Conversion events and windows per campaign. Disabled campaigns keep theirs: texts they
    sent earlier can still earn conversions. A campaign gone from the file gets the defaults."""

    def __init__(self, campaigns: CampaignSet | Iterable[Campaign]) -> None:
        items = campaigns.campaigns if isinstance(campaigns, CampaignSet) else tuple(campaigns)
        self._rules: dict[str, Rule] = {
            c.id: Rule(
                c.conversion_events, c.attribution.after_send_ms, c.attribution.after_click_ms
            )
            for c in items
        }
        every = [*self._rules.values(), DEFAULT_RULE]
        self.conversion_types: frozenset[str] = frozenset().union(
            *(r.conversion_events for r in every)
        )
        self.max_after_send_ms = max(r.after_send_ms for r in every)
        self.max_after_click_ms = max(r.after_click_ms for r in every)

    def get(self, campaign_id: str) -> Rule:
        return self._rules.get(campaign_id, DEFAULT_RULE)


def click_target(click: Click, touches: Iterable[Touch]) -> str | None:
    """The decision a click is on: its own ``decision_id``, else the most recent text before it."""
    if click.decision_id is not None:
        return click.decision_id
    sent = [t for t in touches if not t.holdout and t.at <= click.ts]
    if not sent:
        return None
    return max(sent, key=lambda t: (t.at, t.decision_id)).decision_id


def attribute(
    event: ClickEvent, touches: Iterable[Touch], clicks: Iterable[Click], rules: Rules
) -> tuple[Conversion | None, bool]:
    """The conversion ``event`` earns (or None), and whether its ``value`` was unreadable.

    Pure and order-free: the answer depends only on the sets of touches and clicks of the user.
    """
    user_touches = [t for t in touches if t.user_id == event.user_id]
    clicked: dict[str, list[int]] = defaultdict(list)
    for c in clicks:
        if c.user_id == event.user_id and c.ts <= event.ts:
            target = click_target(c, user_touches)
            if target is not None:
                clicked[target].append(c.ts)
    best: tuple[int, str, Touch, str] | None = None
    for t in user_touches:
        if t.at > event.ts:
            continue
        rule = rules.get(t.campaign_id)
        if event.event_type not in rule.conversion_events:
            continue
        if event.ts - t.at <= rule.after_send_ms:
            via = "send"
        elif any(t.at <= c <= event.ts <= c + rule.after_click_ms for c in clicked[t.decision_id]):
            via = "click"
        else:
            continue
        if best is None or (t.at, t.decision_id) > best[:2]:
            best = (t.at, t.decision_id, t, via)
    revenue, bad_value = revenue_of(event)
    if best is None:
        return None, bad_value
    touch, via = best[2], best[3]
    return (
        Conversion(
            conversion_id=conversion_id(event.user_id, event.event_id),
            event_id=event.event_id,
            event_type=event.event_type,
            user_id=event.user_id,
            ts=event.ts,
            decision_id=touch.decision_id,
            campaign_id=touch.campaign_id,
            touch_at=touch.at,
            via=via,
            variant=touch.variant,
            holdout=touch.holdout,
            revenue=revenue,
        ),
        bad_value,
    )


@dataclass
class AttributionResult:
    conversions: list[Conversion] = field(default_factory=list)
    clicks: dict[str, int] = field(default_factory=dict)  # decision id -> clicks on its link
    conversion_events: int = 0  # events of a conversion type (attributed or not)
    bad_values: int = 0


def attribute_all(
    events: Iterable[ClickEvent], touches: Iterable[Touch], rules: Rules
) -> AttributionResult:
    """Offline attribution over complete data (the report): every event sees every touch."""
    by_user: dict[str, list[Touch]] = defaultdict(list)
    for t in touches:
        by_user[t.user_id].append(t)
    clicks: dict[str, list[Click]] = defaultdict(list)
    candidates: dict[str, ClickEvent] = {}
    for e in events:
        click = Click.from_event(e)
        if click is not None:
            clicks[e.user_id].append(click)
        elif e.event_type in rules.conversion_types:
            candidates.setdefault(e.event_id, e)  # a repeated event id is one conversion
    result = AttributionResult(conversion_events=len(candidates))
    for user, user_clicks in clicks.items():
        for c in user_clicks:
            target = click_target(c, by_user.get(user, ()))
            if target is not None:
                result.clicks[target] = result.clicks.get(target, 0) + 1
    for e in sorted(candidates.values(), key=lambda e: (e.ts, e.event_id)):
        conv, bad = attribute(e, by_user.get(e.user_id, ()), clicks.get(e.user_id, ()), rules)
        result.bad_values += bad
        if conv is not None:
            result.conversions.append(conv)
    return result


@dataclass
class UserState:
    """One user's attribution state in the live shell (stored as JSON in Redis).

    Conversion events wait in ``pending`` until their due time (the shell sets it: arrival plus
    a settle delay), so that the outcome of a text sent just before the purchase (read from
    another topic, possibly later) is in before the choice is made.
    """

    touches: list[Touch] = field(default_factory=list)
    clicks: list[Click] = field(default_factory=list)
    pending: list[tuple[int, ClickEvent]] = field(default_factory=list)  # (due ms, event)
    seen: dict[str, int] = field(default_factory=dict)  # settled event id -> ts (dedup)
    unsent: list[Conversion] = field(default_factory=list)  # settled, not yet on the topic

    def add_touch(self, touch: Touch) -> bool:
        if any(t.decision_id == touch.decision_id for t in self.touches):
            return False  # a redelivered outcome
        self.touches.append(touch)
        self.touches.sort(key=lambda t: (t.at, t.decision_id))
        del self.touches[:-MAX_TOUCHES]
        return True

    def add_click(self, click: Click) -> bool:
        if any(c.event_id == click.event_id for c in self.clicks):
            return False
        self.clicks.append(click)
        self.clicks.sort(key=lambda c: (c.ts, c.event_id))
        del self.clicks[:-MAX_CLICKS]
        return True

    def add_conversion_event(self, event: ClickEvent, due_ms: int) -> bool:
        """Queue a conversion event until ``due_ms``; False for one already queued or settled."""
        if event.event_id in self.seen or any(
            e.event_id == event.event_id for _, e in self.pending
        ):
            return False
        self.pending.append((due_ms, event))
        self.pending.sort(key=lambda p: (p[0], p[1].ts, p[1].event_id))
        del self.pending[MAX_PENDING:]
        return True

    def next_due(self) -> int | None:
        return self.pending[0][0] if self.pending else None

    def settle(self, now_ms: int | None, rules: Rules) -> tuple[list[Conversion], int]:
        """Attribute every pending event due at ``now`` (all of them when ``now`` is None: end of
        input). Returns the conversions and the count of unreadable values."""
        due = sorted(
            (e for d, e in self.pending if now_ms is None or d <= now_ms),
            key=lambda e: (e.ts, e.event_id),
        )
        out: list[Conversion] = []
        bad = 0
        for e in due:
            conv, bad_value = attribute(e, self.touches, self.clicks, rules)
            bad += bad_value
            if conv is not None:
                out.append(conv)
            self.seen[e.event_id] = e.ts
        done = {e.event_id for e in due}
        self.pending = [(d, e) for d, e in self.pending if e.event_id not in done]
        self.unsent.extend(out)
        if len(self.seen) > MAX_SEEN:
            keep = sorted(self.seen.items(), key=lambda kv: kv[1])[-MAX_SEEN:]
            self.seen = dict(keep)
        return out, bad

    def mark_produced(self, conversion_ids: set[str]) -> None:
        """The shell produced (and flushed) these: they need not be sent again after a crash."""
        self.unsent = [c for c in self.unsent if c.conversion_id not in conversion_ids]

    def prune(self, now_ms: int, touch_keep_ms: int, rules: Rules) -> None:
        """Forget what can no longer earn or decide a conversion."""
        self.touches = [t for t in self.touches if now_ms - t.at <= touch_keep_ms]
        self.clicks = [c for c in self.clicks if now_ms - c.ts <= rules.max_after_click_ms]
        horizon = max(touch_keep_ms, rules.max_after_click_ms)
        self.seen = {k: ts for k, ts in self.seen.items() if now_ms - ts <= horizon}

    @property
    def empty(self) -> bool:
        return not (self.touches or self.clicks or self.pending or self.seen or self.unsent)

    def to_json(self) -> dict[str, Any]:
        return {
            "touches": [t.to_json() for t in self.touches],
            "clicks": [c.to_json() for c in self.clicks],
            "pending": [{"due": d, "event": e.to_record()} for d, e in self.pending],
            "seen": self.seen,
            "unsent": [c.to_record() for c in self.unsent],
        }

    @classmethod
    def from_json(cls, d: Any) -> UserState:
        try:
            return cls(
                touches=[Touch.from_json(t) for t in d.get("touches", [])],
                clicks=[Click.from_json(c) for c in d.get("clicks", [])],
                pending=[
                    (int(p["due"]), ClickEvent.from_record(p["event"]))
                    for p in d.get("pending", [])
                ],
                seen={str(k): int(v) for k, v in d.get("seen", {}).items()},
                unsent=[Conversion.from_record(c) for c in d.get("unsent", [])],
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise AttributionError(f"stored attribution state is malformed: {exc}") from None
