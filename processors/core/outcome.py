"""``SmsOutcome``: what the dispatcher did with one decision (topic ``sms-outcomes``).

Every decision ends as exactly one outcome (``sent``, ``suppressed``, ``failed``, ``cancelled``);
a deferred one first gets ``deferred`` (with ``due_at``) and later its final outcome. Outcomes
carry ids, reasons and counts only: never a phone number or the message text, so CRM, email and
ad systems can follow the journey without receiving personal data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Literal

from processors.core.events import iso_ms

Status = Literal["sent", "suppressed", "deferred", "failed", "cancelled"]
STATUSES: frozenset[str] = frozenset({"sent", "suppressed", "deferred", "failed", "cancelled"})
FINAL_STATUSES: frozenset[str] = STATUSES - {"deferred"}


class OutcomeError(ValueError):
    """An outcome record or JSON object is malformed."""


@dataclass(frozen=True, slots=True)
class SmsOutcome:
    decision_id: str
    campaign_id: str
    user_id: str
    status: str
    at: int  # epoch ms: when the dispatcher reached this outcome (virtual time in replays)
    reason: str | None = None
    variant: str | None = None
    message_id: str | None = None
    segments: int | None = None
    encoding: str | None = None
    price: str | None = None
    rule: str | None = None
    due_at: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise OutcomeError(
                f"outcome status must be one of {sorted(STATUSES)}, got {self.status!r}"
            )

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_record(self) -> dict[str, Any]:
        """The Avro ``SmsOutcome`` dict (field names equal the schema's)."""
        # Every field is a scalar: no need for asdict's recursive copy (hot in the dispatcher).
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> SmsOutcome:
        try:
            return cls(
                decision_id=r["decision_id"],
                campaign_id=r["campaign_id"],
                user_id=r["user_id"],
                status=r["status"],
                at=int(r["at"]),
                reason=r.get("reason"),
                variant=r.get("variant"),
                message_id=r.get("message_id"),
                segments=r.get("segments"),
                encoding=r.get("encoding"),
                price=r.get("price"),
                rule=r.get("rule"),
                due_at=None if r.get("due_at") is None else int(r["due_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise OutcomeError(f"invalid SmsOutcome record: {type(exc).__name__}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The ``outcomes.jsonl`` line: the record with ``at`` / ``due_at`` as ISO-8601 UTC."""
        out = self.to_record()
        out["at"] = iso_ms(self.at)
        out["due_at"] = None if self.due_at is None else iso_ms(self.due_at)
        return out

    def dumps(self) -> str:
        """Compact JSON of the record (epoch-ms times), for storing in Redis."""
        return json.dumps(self.to_record(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, text: str | bytes) -> SmsOutcome:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OutcomeError(f"stored outcome is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise OutcomeError("stored outcome is not a JSON object")
        return cls.from_record(data)


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SmsOutcome))
