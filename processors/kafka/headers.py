"""Record headers: the one lookup, and the names NudgeFlow writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DLQ_REASON_HEADER = "nudgeflow-dlq-reason"
"""Why a record was dead-lettered (a short machine-readable token), on every DLQ topic."""

Headers = Sequence[tuple[str, bytes | None]] | Mapping[str, bytes | None] | None


def header(headers: Headers | Any, name: str) -> bytes | None:
    """Value of the first header ``name``: None when absent, ``b""`` when present without a
    value (a valueless control header is still a control record). ``headers``: pairs as
    confluent-kafka and Faust give them, or a mapping."""
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for key, value in items:
        if key == name:
            return bytes(value) if value is not None else b""
    return None


def header_pairs(raw: Any) -> list[tuple[str, bytes | None]]:
    """A consumed message's headers as ``(name, bytes)`` pairs (str values encoded)."""
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
