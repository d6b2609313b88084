"""Delivery receipts: one state per text, folded from the receipts of its parts.

Vonage sends one receipt per *part* of a concatenated message (each part has its own
``messageId``; all share the ``client-ref``, our decision id), and a part may report several
times (``accepted`` or ``buffered`` first, then a final status). Marketers want one answer per
text, so the parts are folded:

* a part's final status (delivered, expired, failed, rejected, unknown) is sticky: a late or
  retried ``accepted`` never undoes it;
* any part that failed (rejected > failed > expired, the worst wins) fails the whole text, at
  once: the recipient cannot have read all of it;
* all expected parts delivered -> ``delivered``; all final but some ``unknown`` -> ``unknown``;
* otherwise the text is still on its way: ``buffered`` if any part is, else ``accepted``.

A folded state is published when its rank rises (pending 1 -> final 2), so each text yields at
most one pending and one final ``DeliveryReceipt``. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Final

STATUSES: Final = ("delivered", "expired", "failed", "rejected", "accepted", "buffered", "unknown")
FINAL: Final = frozenset({"delivered", "expired", "failed", "rejected", "unknown"})
PENDING: Final = frozenset({"accepted", "buffered"})
FAILURES: Final = ("rejected", "failed", "expired")  # worst first
PENDING_RANK: Final = 1
FINAL_RANK: Final = 2

_SCTS = re.compile(r"^[0-9]{10}([0-9]{2})?$")


class ReceiptError(ValueError):
    """A receipt field is malformed; the message names the field, never its value."""


def normalize_status(raw: str | None) -> str:
    """Vonage's status in lower case; a value we do not know becomes ``unknown``."""
    if not raw or not raw.strip():
        raise ReceiptError("status is required")
    status = raw.strip().lower()
    return status if status in STATUSES else "unknown"


def rank(status: str) -> int:
    return FINAL_RANK if status in FINAL else PENDING_RANK


def merge_part(old: str | None, new: str) -> str:
    """A part's status after another receipt for it: final statuses are sticky."""
    if old is None or old not in FINAL:
        return new
    return old


@dataclass(frozen=True, slots=True)
class Folded:
    """The delivery state of one text."""

    status: str
    final: bool
    parts: int  # parts expected (at least the parts seen)
    delivered_parts: int

    @property
    def rank(self) -> int:
        return FINAL_RANK if self.final else PENDING_RANK


def fold(part_statuses: Mapping[str, str] | Iterable[str], expected_parts: int = 1) -> Folded:
    """Fold the latest status of each part (by message id) into the state of the text."""
    statuses = list(part_statuses.values() if isinstance(part_statuses, Mapping) else part_statuses)
    parts = max(1, expected_parts, len(statuses))
    delivered = sum(1 for s in statuses if s == "delivered")
    for failure in FAILURES:
        if failure in statuses:
            return Folded(failure, True, parts, delivered)
    if len(statuses) >= parts and all(s in FINAL for s in statuses):
        status = "delivered" if delivered == len(statuses) else "unknown"
        return Folded(status, True, parts, delivered)
    status = "buffered" if "buffered" in statuses else "accepted"
    return Folded(status, False, parts, delivered)


def sum_prices(prices: Iterable[str | None]) -> str | None:
    """Total price of the parts as a decimal string (None if any part has none or is bad)."""
    total = Decimal(0)
    seen = False
    for price in prices:
        if price is None or price == "":
            return None
        try:
            total += Decimal(price)
        except InvalidOperation:
            return None
        seen = True
    return str(total) if seen else None


def parse_scts(value: str | None) -> int | None:
    """Carrier timestamp ``YYMMDDHHMM`` (or ``YYMMDDHHMMSS``), UTC, as epoch ms."""
    if value is None or value == "":
        return None
    if not _SCTS.match(value):
        raise ReceiptError("scts must be YYMMDDHHMM")
    fmt = "%y%m%d%H%M%S" if len(value) == 12 else "%y%m%d%H%M"
    try:
        moment = datetime.strptime(value, fmt).replace(tzinfo=UTC)
    except ValueError:
        raise ReceiptError("scts is not a valid date") from None
    return int(moment.timestamp() * 1000)


def parse_message_timestamp(value: str | None) -> int | None:
    """Vonage's ``message-timestamp`` (``YYYY-MM-DD HH:MM:SS``, UTC; ISO also accepted)."""
    if value is None or value == "":
        return None
    text = value.strip().replace("T", " ").removesuffix("Z")
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M"):
        try:
            moment = datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return int(moment.timestamp() * 1000)
    raise ReceiptError("message-timestamp must be YYYY-MM-DD HH:MM:SS")
