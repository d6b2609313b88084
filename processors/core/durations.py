"""Durations as written in campaign files: ``45s``, ``30m``, ``1h``, ``2d`` (and ``500ms``)."""

from __future__ import annotations

import re

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_PATTERN = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration(text: str | int) -> int:
    """Return the duration in milliseconds; a bare integer is taken as seconds."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: expected e.g. 45s, 30m, 1h, 2d")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return text * 1_000
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"invalid duration {text!r}: expected e.g. 45s, 30m, 1h, 2d")
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def format_duration(ms: int) -> str:
    """The shortest exact spelling of a duration, for messages and outcome rules."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
