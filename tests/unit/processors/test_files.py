"""Event files: bad lines are reported by number and reason and skipped; the rest flows."""

from __future__ import annotations

import json
from pathlib import Path

from processors.core.events import parse_event
from processors.files import LineErrors, read_events


def test_jsonl_bad_lines_are_reported_by_number_and_skipped(tmp_path: Path) -> None:
    good = {"event_id": "e1", "user_id": "u1", "event_type": "add_to_cart",
            "ts": "2024-03-13T10:23:32Z", "session_id": "s1",
            "properties": {"product_id": "p9"}}  # fmt: skip
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "event_id": "e2", "user_id": ""}),
        json.dumps({**good, "event_id": "e3", "ts": "yesterday"}),
        json.dumps({**good, "event_id": "e4", "ts": "2024-03-13T10:23:32"}),  # no zone
        "",
        json.dumps([1, 2]),
        json.dumps({**good, "event_id": "e5", "ts": 1710325412000}),  # epoch millis
        json.dumps({**good, "event_id": "e6", "ts": 1710325412}),  # seconds: a unit mistake
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    seen: list[str] = []
    errors = LineErrors(str(path), echo=seen.append)
    events = list(read_events(path, errors))
    assert [e.event_id for e in events] == ["e1", "e5"]
    assert events[1].ts == events[0].ts == 1_710_325_412_000
    assert [line for line, _ in errors.errors] == [2, 3, 4, 5, 7, 9]
    reasons = dict(errors.errors)
    assert "not valid JSON" in reasons[2]
    assert "missing_user_id" in reasons[3]
    assert "bad_ts" in reasons[4] and "no time zone" in reasons[5]
    assert "ts_out_of_range" in reasons[9]
    assert seen[0].startswith(f"{path}:2: skipped:")


def test_csv_columns_and_properties(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "event_id,user_id,event_type,ts,session_id,product_id,cart_value\n"
        "e1,u1,add_to_cart,2024-03-13T10:23:32Z,s1,p9,19.99\n"
        "e2,u1,page_view,1710325413000,,,\n"
        "e3,,page_view,1710325413000,,,\n"
    )
    errors = LineErrors(str(path), echo=None)
    events = list(read_events(path, errors))
    assert [(e.event_id, e.properties, e.session_id) for e in events] == [
        ("e1", {"product_id": "p9", "cart_value": "19.99"}, "s1"),
        ("e2", {}, None),
    ]
    assert [line for line, _ in errors.errors] == [4]


def test_missing_event_id_is_derived_stably_from_content() -> None:
    a = parse_event({"user_id": "u1", "event_type": "v", "ts": 1710325412000, "properties": {}})
    b = parse_event({"ts": 1710325412000, "event_type": "v", "properties": {}, "user_id": "u1"})
    c = parse_event({"user_id": "u1", "event_type": "v", "ts": 1710325412001, "properties": {}})
    assert a.event_id == b.event_id != c.event_id
    assert a.event_id.startswith("h-")
