"""What the report counts (:class:`ReportInput`) and the parsers of a demo directory's lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from processors.core.attribution import (
    Conversion,
    Touch,
)
from processors.core.campaign import CampaignSet
from processors.core.events import EventError, parse_ts
from processors.core.outcome import FINAL_STATUSES, OutcomeError, SmsOutcome


class ReportError(RuntimeError):
    """The report cannot be built from this input; the message says what is missing."""


DELIVERED = "delivered"


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


def text_field(obj: dict[str, Any], key: str) -> str:
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
            decision_id=text_field(obj, "decision_id"),
            campaign_id=text_field(obj, "campaign_id"),
            user_id=text_field(obj, "user_id"),
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
