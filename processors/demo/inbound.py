"""Inbound STOP/START replies of ``nudgeflow demo --inbound``, applied in event time."""

from __future__ import annotations

from pathlib import Path


def load_inbound(path: Path) -> list[tuple[str, str, int]]:
    """``{"msisdn": "+14155550100", "text": "STOP", "ts": "2024-03-14T10:00:00Z"}`` lines ->
    ``(E.164 phone, opted_out|opted_in, at ms)`` for the STOP- and START-class keywords (HELP
    and other texts change nothing here). Bad lines are reported and skipped."""
    from processors.core.contact import normalize_phone
    from processors.core.events import parse_ts
    from processors.core.keywords import classify
    from processors.files import LineErrors, read_parsed

    def parse(obj: dict[str, object]) -> tuple[str, str, int] | None:
        raw = str(obj.get("msisdn") or "")
        phone = normalize_phone(raw if raw.startswith("+") else f"+{raw}")
        kind = classify(str(obj.get("text") or ""))
        at = parse_ts(obj.get("ts"))
        if kind not in ("stop", "start"):
            return None
        return phone, "opted_out" if kind == "stop" else "opted_in", at

    rows = read_parsed(path, parse, LineErrors(str(path)))
    return [row for _line, row in rows if row is not None]
