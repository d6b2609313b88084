"""``parse_event``'s shortcut for the commonest records against the reference reading.

Records mix every accepted and refused form of each field (ids as strings, numbers, blanks,
other types; ``ts`` as ISO with ``Z``, ``z``, offsets, no zone, padding, epoch numbers and
digit strings; properties of strings, numbers, booleans and nulls): the result,
or the error, must be :func:`parse_any_event`'s.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.core.events import ClickEvent, EventError, parse_any_event, parse_event

IDS = st.one_of(
    st.sampled_from(["e1", "u1", "add_to_cart", "", " ", "\x00u", "x" * 257]),
    st.text(max_size=5),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=1),
)
TS = st.one_of(
    st.sampled_from(
        [
            "2024-03-13T10:23:32Z",
            "2024-03-13T10:23:32.617Z",
            "2024-03-13T10:23:32.6175Z",
            " 2024-03-13T10:23:32Z",
            "2024-03-13T10:23:32Z ",
            "2024-03-13T10:23:32z",
            "2024-03-13T10:23:32+02:00",
            "2024-03-13T10:23:32",
            "2024-03-13Z",
            "2024-03-13T25:00:00Z",
            "1999-12-31T23:59:59Z",
            "2100-01-01T00:00:00Z",
            "yesterdayZ",
            "Z",
            "1710325412000",
            " 1710325412000 ",
            "",
        ]
    ),
    st.integers(0, 5_000_000_000_000),
    st.floats(),
    st.booleans(),
    st.none(),
)
VALUES = st.one_of(
    st.text(max_size=3), st.integers(), st.floats(), st.booleans(), st.none(), st.just("v" * 2049)
)
PROPERTIES = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), VALUES, max_size=3),
    st.lists(st.text(), max_size=1),
    st.text(max_size=2),
)
FIELDS = {
    "event_id": IDS,
    "user_id": IDS,
    "event_type": IDS,
    "session_id": IDS,
    "ts": TS,
    "properties": PROPERTIES,
}


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    present = draw(st.sets(st.sampled_from(sorted(FIELDS))))
    # mostly the canonical shape, so the shortcut's own path is exercised too
    canonical = draw(st.booleans())
    record: dict[str, Any] = {}
    for name in sorted(FIELDS):
        if canonical and name != "properties":
            record[name] = draw(
                st.just("2024-03-13T10:23:32.617Z") | TS if name == "ts" else st.just("x") | IDS
            )
        elif name in present:
            record[name] = draw(FIELDS[name])
    return record


def outcome(parse: Any, record: dict[str, Any]) -> tuple[str, Any]:
    try:
        event: ClickEvent = parse(record)
    except EventError as exc:
        return "error", str(exc)
    return "event", event.to_record()


@settings(max_examples=600, deadline=None)
@given(records())
def test_shortcut_reads_every_record_as_the_reference(record: dict[str, Any]) -> None:
    assert outcome(parse_event, record) == outcome(parse_any_event, record)


def test_canonical_record_takes_the_shortcut_with_the_same_fields() -> None:
    record = {
        "event_id": "e1",
        "user_id": "u1",
        "event_type": "add_to_cart",
        "ts": "2024-03-13T10:23:32.617Z",
        "session_id": "",
        "properties": {"product_id": "p9"},
    }
    event = parse_event(record)
    assert event.to_record() == {
        "event_id": "e1",
        "user_id": "u1",
        "event_type": "add_to_cart",
        "ts": 1_710_325_412_617,
        "session_id": None,
        "properties": {"product_id": "p9"},
    }
    assert event.properties is not record["properties"]  # the caller's dict is not kept
    assert event == parse_any_event(record)
