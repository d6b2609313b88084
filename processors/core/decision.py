"""Trigger decisions and their cancellations, the records on the send topic.

A decision id is a pure function of (campaign id, user id, the episode's first event id or the
firing event id), so the stream path and the backtest path give the same ids on every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from processors.core.events import iso_ms


def make_decision_id(campaign_id: str, user_id: str, event_id: str) -> str:
    """Short (33 chars, fits Vonage's 100-char client-ref) and collision-resistant."""
    raw = f"{campaign_id}\x1f{user_id}\x1f{event_id}".encode()
    return "d-" + hashlib.blake2b(raw, digest_size=16).hexdigest()[:31]


@dataclass(frozen=True, slots=True)
class Decision:
    decision_id: str
    campaign_id: str
    user_id: str
    fire_at: int  # epoch ms: when the text is due
    trigger_event_ids: tuple[str, ...]
    trigger_ts: int  # ts of the event that made the decision (latency metrics)
    variant: str | None = None
    stage: str | None = None
    priority: int = 0
    properties: dict[str, str] = field(default_factory=dict)
    clock: str = "event"
    decided_at: int | None = None

    def to_record(self) -> dict[str, Any]:
        """The Avro ``TriggerDecision`` dict."""
        return {
            "decision_id": self.decision_id,
            "campaign_id": self.campaign_id,
            "user_id": self.user_id,
            "fire_at": self.fire_at,
            "trigger_event_ids": list(self.trigger_event_ids),
            "trigger_ts": self.trigger_ts,
            "variant": self.variant,
            "stage": self.stage,
            "priority": self.priority,
            "properties": dict(self.properties),
            "clock": self.clock,
            "decided_at": self.decided_at,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Decision:
        return cls(
            decision_id=r["decision_id"],
            campaign_id=r["campaign_id"],
            user_id=r["user_id"],
            fire_at=int(r["fire_at"]),
            trigger_event_ids=tuple(r.get("trigger_event_ids") or ()),
            trigger_ts=int(r.get("trigger_ts") or r["fire_at"]),
            variant=r.get("variant"),
            stage=r.get("stage"),
            priority=int(r.get("priority") or 0),
            properties=dict(r.get("properties") or {}),
            clock=r.get("clock") or "event",
            decided_at=r.get("decided_at"),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``decisions.jsonl`` line (ISO-8601 UTC times)."""
        return {
            "decision_id": self.decision_id,
            "campaign_id": self.campaign_id,
            "user_id": self.user_id,
            "fire_at": iso_ms(self.fire_at),
            "trigger_event_ids": list(self.trigger_event_ids),
            "variant": self.variant,
            "stage": self.stage,
            "priority": self.priority,
        }


@dataclass(frozen=True, slots=True)
class DecisionCancelled:
    """Tells the dispatcher to drop a send it still holds (``converted``), or that a decision
    made from out-of-order input no longer holds once the input is in order (``reordered``)."""

    decision_id: str
    campaign_id: str
    user_id: str
    reason: str
    at: int

    def to_record(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "campaign_id": self.campaign_id,
            "user_id": self.user_id,
            "reason": self.reason,
            "at": self.at,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> DecisionCancelled:
        return cls(r["decision_id"], r["campaign_id"], r["user_id"], r["reason"], int(r["at"]))
