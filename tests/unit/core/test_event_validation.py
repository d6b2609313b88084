"""``validate``'s fast path and ``make_event`` against the plain checks they shortcut.

``validate`` accepts the common valid event with a few type/length tests and only runs the
field-by-field checks otherwise; every event must still get exactly the reason (or acceptance)
of those checks, because the reason is the dead-letter header.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from processors.core.events import (
    MAX_ID_LEN,
    MAX_TS_MS,
    MIN_TS_MS,
    ClickEvent,
    EventError,
    make_event,
    validate,
)

T0 = 1_710_325_412_000


class Text(str):
    """A str subclass: accepted like a str, but not taken by the fast path."""


def reference(event: ClickEvent) -> str | None:
    """The checks of ``validate`` written plainly, in order; None = valid."""
    for name in ("event_id", "user_id", "event_type"):
        value = getattr(event, name)
        if not isinstance(value, str) or not value.strip():
            return f"missing_{name}"
        if len(value) > MAX_ID_LEN:
            return f"bad_{name}"
    if event.user_id.startswith("\x00"):
        return "bad_user_id"
    if not MIN_TS_MS <= event.ts < MAX_TS_MS:
        return "ts_out_of_range"
    if len(event.properties) > 64:
        return "oversized_properties"
    for key, value in event.properties.items():
        if len(key) > 128 or len(value) > 2_048:
            return "oversized_properties"
    return None


def outcome(event: ClickEvent) -> str | None:
    try:
        assert validate(event) is event
    except EventError as exc:
        return exc.reason
    return None


IDS: list[Any] = [
    "e1", "", " ", "\t\n", "\u2003", "\x1c", " x ", "\x00", "\x00u", "u\x00", "x" * MAX_ID_LEN,
    "x" * (MAX_ID_LEN + 1), " " * (MAX_ID_LEN + 1), Text("t"), Text(" "), None, 7,
]  # fmt: skip


def test_validate_reason_equals_the_plain_checks() -> None:
    for ids in itertools.product(IDS, repeat=3):
        event = ClickEvent(ids[0], ids[1], ids[2], T0, "s1", {"k": "v"})
        assert outcome(event) == reference(event), ids


@pytest.mark.parametrize(
    ("ts", "props"),
    [
        (MIN_TS_MS - 1, {}),
        (MIN_TS_MS, {}),
        (MAX_TS_MS - 1, {}),
        (MAX_TS_MS, {}),
        (T0, {f"k{i}": "v" for i in range(65)}),
        (T0, {f"k{i}": "v" for i in range(64)}),
        (T0, {"k" * 129: "v"}),
        (T0, {"k": "v" * 2_049}),
        (T0, {"k" * 128: "v" * 2_048}),
    ],
)
def test_bounds_after_the_ids_are_unchanged(ts: int, props: dict[str, str]) -> None:
    event = ClickEvent("e1", "u1", "view", ts, None, props)
    assert outcome(event) == reference(event)


def test_make_event_is_the_constructor() -> None:
    args = ("e1", "u1", "add_to_cart", T0, "s1", {"p": "1"})
    made = make_event(*args)
    assert type(made) is ClickEvent
    assert made == ClickEvent(*args)
    assert repr(made) == repr(ClickEvent(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.ts = 0  # type: ignore[misc]


def test_from_record_copies_properties_and_validates() -> None:
    record = {"event_id": "e1", "user_id": "u1", "event_type": "v", "ts": T0,
              "session_id": None, "properties": {"p": "1"}}  # fmt: skip
    event = ClickEvent.from_record(record)
    assert event == ClickEvent("e1", "u1", "v", T0, None, {"p": "1"})
    assert event.properties is not record["properties"]
    with pytest.raises(EventError) as exc:
        ClickEvent.from_record({**record, "user_id": "\x00u1"})
    assert exc.value.reason == "bad_user_id"
