"""``validate``'s fast path and ``make_event`` against the plain checks they shortcut.

``validate`` accepts the common valid event with a few type/length tests and only runs the
field-by-field checks otherwise; every event must still get exactly the reason (or acceptance)
of those checks, because the reason is the dead-letter header.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import pickle
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


ID_FIELDS = ("event_id", "user_id", "event_type")


def reference(record: dict[str, Any]) -> str | None:
    """The checks of ``validate`` written plainly, in order, on a record's values; None = valid."""
    for name in ID_FIELDS:
        value = record[name]
        if not isinstance(value, str) or not value.strip():
            return f"missing_{name}"
        if len(value) > MAX_ID_LEN:
            return f"bad_{name}"
    if record["user_id"].startswith("\x00"):
        return "bad_user_id"
    session_id = record.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        return "bad_session_id"
    if not MIN_TS_MS <= record["ts"] < MAX_TS_MS:
        return "ts_out_of_range"
    properties = record.get("properties") or {}
    if len(properties) > 64:
        return "oversized_properties"
    for key, value in properties.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return "bad_properties"
        if len(key) > 128 or len(value) > 2_048:
            return "oversized_properties"
    return None


def outcome(record: dict[str, Any]) -> str | None:
    """``ClickEvent.from_record``'s reason (None = accepted); when the values are of the field
    types (the compiled build's ``ClickEvent`` refuses others with a TypeError), ``validate``
    must give the same one on the event built from them."""
    try:
        reason = None
        event = ClickEvent.from_record(record)
        assert event == ClickEvent(**record)
    except EventError as exc:
        reason = exc.reason
    properties = record.get("properties") or {}
    session_id = record.get("session_id")
    if (
        all(isinstance(record[name], str) for name in ID_FIELDS)
        and (session_id is None or isinstance(session_id, str))
        and all(isinstance(k, str) and isinstance(v, str) for k, v in properties.items())
    ):
        event = ClickEvent(**record)
        try:
            assert validate(event) is event
            assert reason is None
        except EventError as exc:
            assert exc.reason == reason
    return reason


IDS: list[Any] = [
    "e1", "", " ", "\t\n", "\u2003", "\x1c", " x ", "\x00", "\x00u", "u\x00", "x" * MAX_ID_LEN,
    "x" * (MAX_ID_LEN + 1), " " * (MAX_ID_LEN + 1), Text("t"), Text(" "), None, 7,
]  # fmt: skip


def record(
    ids: tuple[Any, Any, Any] = ("e1", "u1", "view"),
    ts: int = T0,
    session_id: Any = "s1",
    properties: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    props = {"k": "v"} if properties is None else properties
    return {"event_id": ids[0], "user_id": ids[1], "event_type": ids[2], "ts": ts,
            "session_id": session_id, "properties": props}  # fmt: skip


def test_validate_reason_equals_the_plain_checks() -> None:
    for ids in itertools.product(IDS, repeat=3):
        rec = record(ids)
        assert outcome(rec) == reference(rec), ids


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
        (T0, {"k": 7}),
        (T0, {"k": None}),
        (T0, {7: "v"}),
        (T0, {"k": ["v"]}),
        (T0, {"k" * 129: 7}),
        (T0, {"a": "v", "k": Text("t")}),
    ],
)
def test_bounds_after_the_ids_are_unchanged(ts: int, props: dict[Any, Any]) -> None:
    rec = record(ts=ts, properties=props)
    assert outcome(rec) == reference(rec)


@pytest.mark.parametrize("session_id", [None, "", "s1", Text("s"), 7, ["s"], b"s"])
def test_a_session_id_is_a_string_or_none(session_id: Any) -> None:
    rec = record(session_id=session_id, ts=MAX_TS_MS)  # two faults: the first one is reported
    assert outcome(rec) == reference(rec)
    assert outcome(record(session_id=session_id)) == reference(record(session_id=session_id))


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


def test_an_event_pickles_copies_and_stays_frozen() -> None:
    event = ClickEvent("e1", "u1", "add_to_cart", T0, None, {"p": "1"})
    for other in (
        pickle.loads(pickle.dumps(event)),
        copy.copy(event),
        copy.deepcopy(event),
        dataclasses.replace(event),
    ):
        assert type(other) is ClickEvent
        assert other == event
        assert repr(other) == repr(event)
    assert ClickEvent("e1", "u1", "v", T0).properties == {}
    assert (
        ClickEvent("e1", "u1", "v", T0).properties is not ClickEvent("e1", "u1", "v", T0).properties
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.properties = {}  # type: ignore[misc]
