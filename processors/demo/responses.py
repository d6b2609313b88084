"""What the demo's shoppers do with the texts they get, in event time (a stated model).

:func:`plan_responses`: click the short link, buy (or submit the form, complete the booking,
check in at the event), reply STOP; some shoppers also come back by themselves, text or no
text, so the holdout has a baseline. This is a *model of the world*, stated here so nobody
mistakes its figures for a measurement:

- the chance to click falls with the time from the action to the text (intent half-life
  :data:`INTENT_HALF_LIFE_H` hours), so late texts (quiet hours, the slower variant) convert worse;
- the ``copy-scarcity`` copy of cart recovery is clicked :data:`COPY_EFFECT` times as often;
- a reminded attendee checks in more often than one who was not reminded.

Pure: deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from processors.core.events import parse_ts
from processors.demo.day import DAY_SEED
from processors.simulate import HOUR, MINUTE, PRODUCTS

if TYPE_CHECKING:
    from processors.core.campaign import CampaignSet
    from processors.core.decision import Decision


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
