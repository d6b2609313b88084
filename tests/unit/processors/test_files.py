"""Event files: bad lines are reported by number and reason and skipped; the rest flows."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.core.events import parse_event
from processors.files import LineErrors, read_events, read_rows


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


def reference_rows(path: Path) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """JSON Lines read with the standard library alone: what ``read_rows`` must yield."""
    rows: list[tuple[int, Any]] = []
    bad: list[tuple[int, str]] = []
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        for number, raw in enumerate(fh, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                bad.append((number, "not valid UTF-8"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                bad.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            except RecursionError:
                bad.append((number, "not valid JSON (nested too deeply)"))
                continue
            if not isinstance(obj, dict):
                bad.append((number, "not a JSON object"))
                continue
            rows.append((number, obj))
    return rows, bad


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(["2024-03-13T10:23:32.617Z", "\u2028", "\ufeff"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
LINES = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=4).map(
        lambda v: json.dumps(v, ensure_ascii=False).encode()
    ),
    st.sampled_from(
        [
            b"{not json",
            b'{"a": NaN}',
            b'{"a": 1e400}',
            b'{"a": "\xff\xfe"}',
            b'{"a": "\xff"}',
            b'{"a": 1} x',
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]"
            b"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
            b'{"a": 123456789012345678901234567890}',
            b'{"a": 1.0, "b": {"c": [2.5]}}',
            b"# a comment",
            b"   ",
            b"\xef\xbb\xbf{}",
            b'{"a": "x"}\r',
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LINES, max_size=6))
def test_json_lines_are_read_as_the_standard_library_reads_them(lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        errors = LineErrors(str(path), echo=None)
        rows = list(read_rows(path, errors))
        expected, bad = reference_rows(path)
        assert errors.errors == bad
        # the same values of the same types (an integer is not read as a float; NaN is NaN)
        assert [(n, repr(obj)) for n, obj in rows] == [(n, repr(obj)) for n, obj in expected]
