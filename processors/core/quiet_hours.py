"""Quiet hours in the recipient's local time: no marketing text between ``from`` and ``to``.

The window is ``[start, end)`` in local wall-clock time; ``start > end`` wraps past midnight
(the default 20:00-09:00 is stricter than the TCPA's 21:00-08:00). A text due inside the window
is deferred to its end, or dropped, as the campaign says. All time arrives as epoch millis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

QuietAction = Literal["defer", "drop"]

DEFAULT_START = time(20, 0)
DEFAULT_END = time(9, 0)

_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


class QuietHoursError(ValueError):
    """The ``quiet_hours`` block of a campaign is malformed."""


@dataclass(frozen=True)
class QuietHours:
    start: time = DEFAULT_START
    end: time = DEFAULT_END
    action: QuietAction = "defer"

    def is_quiet_at(self, local: time) -> bool:
        """Whether a local wall-clock time falls in ``[start, end)`` (wrapping past midnight)."""
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


def _parse_time(value: Any, field: str) -> time:
    if isinstance(value, time):
        return value.replace(second=0, microsecond=0, tzinfo=None)
    if isinstance(value, int) and not isinstance(value, bool):
        # PyYAML (YAML 1.1) reads an unquoted 20:00 as the base-60 number 1200.
        raise QuietHoursError(
            f"quiet_hours.{field}: got the number {value}; write the time in quotes, "
            f'e.g. {field}: "20:00" (YAML reads unquoted 20:00 as a number)'
        )
    match = _HHMM.match(value) if isinstance(value, str) else None
    if not match:
        raise QuietHoursError(f'quiet_hours.{field}: expected "HH:MM" (00:00-23:59), got {value!r}')
    return time(int(match.group(1)), int(match.group(2)))


def parse_quiet_hours(raw: Any) -> QuietHours:
    """Parse ``{from: "20:00", to: "09:00", action: defer}``; missing keys take the defaults.

    ``None`` gives the defaults (20:00-09:00, defer). Whether a campaign may switch quiet hours
    off altogether is the campaign loader's decision, not this parser's.
    """
    if raw is None:
        return QuietHours()
    if not isinstance(raw, dict):
        raise QuietHoursError(
            f'quiet_hours: expected a mapping like {{from: "20:00", to: "09:00", action: defer}}, '
            f"got {type(raw).__name__}"
        )
    unknown = sorted(set(map(str, raw)) - {"from", "to", "action"})
    if unknown:
        raise QuietHoursError(f"quiet_hours: unknown field(s) {', '.join(unknown)}")
    start = _parse_time(raw["from"], "from") if "from" in raw else DEFAULT_START
    end = _parse_time(raw["to"], "to") if "to" in raw else DEFAULT_END
    action = raw.get("action", "defer")
    if action not in ("defer", "drop"):
        raise QuietHoursError(f"quiet_hours.action: expected defer or drop, got {action!r}")
    if start == end:
        raise QuietHoursError(f"quiet_hours: from and to are both {start:%H:%M}; they must differ")
    return QuietHours(start=start, end=end, action=action)


def _to_ms(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _from_ms(ms: int, tz: ZoneInfo) -> datetime:
    # Integer seconds keep the conversion exact; replace() (unlike + timedelta) keeps ``fold``.
    return datetime.fromtimestamp(ms // 1000, tz).replace(microsecond=(ms % 1000) * 1000)


def _first_instant_at_or_after(day: date, wall: time, tz: ZoneInfo, after_ms: int) -> int:
    """Epoch ms of the first instant after ``after_ms`` whose local wall time is ``day wall``.

    Ambiguous times (autumn fall-back) take the earlier occurrence unless that one is not after
    ``after_ms``. A non-existent time (spring-forward gap) resolves to the end of the gap, i.e.
    the first valid instant after it.
    """
    naive = datetime.combine(day, wall)
    for fold in (0, 1):
        local = naive.replace(tzinfo=tz, fold=fold)
        ms = _to_ms(local)
        exists = _from_ms(ms, tz).replace(tzinfo=None) == naive
        if exists and ms > after_ms:
            return ms
        if not exists:
            return _gap_end_ms(naive, tz)
    # Both occurrences are not after ``after_ms``: cannot happen for callers, which only ask
    # for wall times later than now's; answer something safe rather than crash.
    return after_ms + 1


def _gap_end_ms(naive: datetime, tz: ZoneInfo) -> int:
    """The transition instant that skips over ``naive``: the first valid instant after it."""
    # fold=1 interprets the wall time with the post-transition offset (an instant before the
    # transition), fold=0 with the pre-transition offset (an instant after it).
    lo = _to_ms(naive.replace(tzinfo=tz, fold=1)) // 1000
    hi = _to_ms(naive.replace(tzinfo=tz, fold=0)) // 1000
    if lo > hi:
        lo, hi = hi, lo
    after = datetime.fromtimestamp(hi, tz).utcoffset()
    while hi - lo > 1:  # offsets change on whole seconds
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi * 1000


def quiet_until(qh: QuietHours, now_ms: int, tz: ZoneInfo) -> int | None:
    """``None`` if ``now_ms`` is outside quiet hours in ``tz``, else the epoch ms they end.

    The end is the next local wall time ``qh.end`` (today's, or tomorrow's when the window
    started this evening), converted through ``tz`` so DST days are right: on a spring-forward
    day an end inside the gap becomes the first valid instant after the gap.
    """
    local = _from_ms(now_ms, tz)
    wall = local.time().replace(tzinfo=None)
    if not qh.is_quiet_at(wall):
        return None
    day = local.date()
    if qh.start > qh.end and wall >= qh.start:
        day += timedelta(days=1)
    return _first_instant_at_or_after(day, qh.end, tz, now_ms)


def is_stale(decision_fire_at_ms: int, due_ms: int, max_defer_ms: int) -> bool:
    """Whether a text meant for ``decision_fire_at_ms`` is too late to send at ``due_ms``.

    Stale when it would go out more than ``max_defer_ms`` after it was meant to (exactly
    ``max_defer_ms`` late is still fine): a cart reminder deferred past quiet hours into the
    next afternoon is noise.
    """
    if max_defer_ms < 0:
        raise ValueError(f"max_defer_ms must not be negative, got {max_defer_ms}")
    return due_ms - decision_fire_at_ms > max_defer_ms
