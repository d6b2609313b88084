"""Quiet hours in recipient-local time, including across midnight and on DST days."""

from __future__ import annotations

from datetime import datetime, time
from zoneinfo import ZoneInfo

import pytest

from processors.core.quiet_hours import (
    QuietHours,
    QuietHoursError,
    is_stale,
    parse_quiet_hours,
    quiet_until,
)

LA = ZoneInfo("America/Los_Angeles")
KOLKATA = ZoneInfo("Asia/Kolkata")
DEFAULT = QuietHours()
H = 3_600_000


def ms(iso: str) -> int:
    """Epoch ms of an ISO-8601 time with an explicit offset."""
    moment = datetime.fromisoformat(iso)
    assert moment.tzinfo is not None
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def test_late_evening_in_la_defers_to_nine_next_morning() -> None:
    now = ms("2026-01-16T07:30:00+00:00")  # 23:30 PST on Jan 15
    assert quiet_until(DEFAULT, now, LA) == ms("2026-01-16T09:00:00-08:00")


def test_early_morning_in_la_defers_to_nine_same_day() -> None:
    now = ms("2026-01-16T14:00:00+00:00")  # 06:00 PST
    assert quiet_until(DEFAULT, now, LA) == ms("2026-01-16T09:00:00-08:00")


def test_boundaries_are_start_inclusive_end_exclusive() -> None:
    assert quiet_until(DEFAULT, ms("2026-01-16T19:59:59.999-08:00"), LA) is None
    assert quiet_until(DEFAULT, ms("2026-01-16T20:00:00-08:00"), LA) == ms(
        "2026-01-17T09:00:00-08:00"
    )
    assert quiet_until(DEFAULT, ms("2026-01-17T08:59:59.999-08:00"), LA) == ms(
        "2026-01-17T09:00:00-08:00"
    )
    assert quiet_until(DEFAULT, ms("2026-01-17T09:00:00-08:00"), LA) is None


def test_same_instant_differs_by_recipient_zone() -> None:
    now = ms("2026-01-16T07:30:00+00:00")  # 23:30 in LA, 13:00 in Kolkata
    assert quiet_until(DEFAULT, now, KOLKATA) is None
    assert quiet_until(DEFAULT, now, LA) is not None


def test_kolkata_night() -> None:
    now = ms("2026-01-16T17:00:00+00:00")  # 22:30 IST
    assert quiet_until(DEFAULT, now, KOLKATA) == ms("2026-01-17T09:00:00+05:30")
    assert quiet_until(DEFAULT, now, KOLKATA) == ms("2026-01-17T03:30:00+00:00")


def test_same_day_range() -> None:
    lunch = QuietHours(start=time(12, 0), end=time(13, 30), action="drop")
    assert quiet_until(lunch, ms("2026-01-16T11:59:00-08:00"), LA) is None
    assert quiet_until(lunch, ms("2026-01-16T12:45:00-08:00"), LA) == ms(
        "2026-01-16T13:30:00-08:00"
    )
    assert quiet_until(lunch, ms("2026-01-16T13:30:00-08:00"), LA) is None
    assert quiet_until(lunch, ms("2026-01-16T23:00:00-08:00"), LA) is None


def test_end_on_spring_forward_day_uses_the_new_offset() -> None:
    # 2026-03-08: LA clocks jump 02:00 PST -> 03:00 PDT. 09:00 that morning is PDT.
    now = ms("2026-03-07T23:00:00-08:00")
    assert quiet_until(DEFAULT, now, LA) == ms("2026-03-08T09:00:00-07:00")
    # Quiet-hours time span is one hour shorter than the wall-clock difference.
    assert quiet_until(DEFAULT, now, LA) - now == 9 * H


def test_end_inside_spring_forward_gap_is_first_valid_instant() -> None:
    qh = QuietHours(start=time(22, 0), end=time(2, 30))
    now = ms("2026-03-08T01:15:00-08:00")
    # 02:30 does not exist; the first instant after it is the transition, 03:00 PDT.
    assert quiet_until(qh, now, LA) == ms("2026-03-08T03:00:00-07:00")
    assert quiet_until(qh, now, LA) == ms("2026-03-08T10:00:00+00:00")


def test_end_on_fall_back_day() -> None:
    # 2026-11-01: LA clocks go 02:00 PDT -> 01:00 PST; 01:30 happens twice.
    qh = QuietHours(start=time(22, 0), end=time(1, 30))
    first = ms("2026-11-01T01:10:00-07:00")
    assert quiet_until(qh, first, LA) == ms("2026-11-01T01:30:00-07:00")
    second = ms("2026-11-01T01:10:00-08:00")  # after the first 01:30 has already passed
    assert quiet_until(qh, second, LA) == ms("2026-11-01T01:30:00-08:00")
    # A 09:00 end that day is PST.
    assert quiet_until(DEFAULT, ms("2026-10-31T23:00:00-07:00"), LA) == ms(
        "2026-11-01T09:00:00-08:00"
    )


def test_parse_defaults_and_values() -> None:
    assert parse_quiet_hours(None) == QuietHours(time(20, 0), time(9, 0), "defer")
    assert parse_quiet_hours({}) == QuietHours(time(20, 0), time(9, 0), "defer")
    assert parse_quiet_hours({"from": "21:00", "to": "08:00", "action": "drop"}) == QuietHours(
        time(21, 0), time(8, 0), "drop"
    )
    assert parse_quiet_hours({"from": "7:05"}).start == time(7, 5)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"from": "25:00"}, r'quiet_hours\.from: expected "HH:MM"'),
        ({"to": "9am"}, r"quiet_hours\.to"),
        ({"from": 1200}, "write the time in quotes"),
        ({"action": "skip"}, r"quiet_hours\.action: expected defer or drop"),
        ({"from": "09:00", "to": "09:00"}, "must differ"),
        ({"start": "20:00"}, r"unknown field\(s\) start"),
        ("20:00-09:00", "expected a mapping"),
    ],
)
def test_parse_errors(raw: object, message: str) -> None:
    with pytest.raises(QuietHoursError, match=message):
        parse_quiet_hours(raw)


def test_is_stale() -> None:
    fire = ms("2026-01-15T23:30:00-08:00")
    due = ms("2026-01-16T09:00:00-08:00")  # 9.5 h later
    assert not is_stale(fire, due, max_defer_ms=12 * H)
    assert is_stale(fire, due, max_defer_ms=9 * H)
    assert not is_stale(fire, due, max_defer_ms=due - fire)
    assert is_stale(fire, due, max_defer_ms=due - fire - 1)
    with pytest.raises(ValueError):
        is_stale(fire, due, -1)
