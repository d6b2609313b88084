"""Hostile and broken files given to ``produce``, ``backtest``, ``contacts import`` (and ``demo``).

A bad line is reported as ``FILE:LINE: skipped: reason`` on stderr and skipped; the good lines
still flow and give the same result as a file without the bad ones. A bad campaign file stops the
command at load with exit code 2 and a message naming the campaign and the field. (The demo's
handling of bad event and contact lines is checked by the demo run in ``tests/test_privacy.py``.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.commands import cli
from processors.commands.backtest import run_backtest
from processors.core.campaign import load_campaigns
from processors.core.contact import ContactError, parse_contact_row
from processors.core.events import EventError, parse_event
from processors.files import LineErrors, read_events
from processors.settings import REPO_ROOT, Settings
from schemas.codec import Codec
from tests.integration.test_streams_smoke import worker_env

EXAMPLES = REPO_ROOT / "examples"
CAMPAIGNS = EXAMPLES / "campaigns.yaml"
EVENTS = EXAMPLES / "events.jsonl"
GOOD = {"user_id": "u-zed", "event_type": "add_to_cart", "ts": "2024-03-13T10:00:00Z"}

# (line, reason the report must mention); the line numbers are where these go in the file
BAD_EVENT_LINES: list[tuple[str | bytes, str]] = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('"just a string"', "not a JSON object"),
    ("[" * 100_000, "nested too deeply"),
    (b'{"user_id": "u-\xff\xfe", "event_type": "x", "ts": 1710325412000}', "not valid UTF-8"),
    (json.dumps({**GOOD, "user_id": ""}), "missing_user_id"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "user_id"}), "missing_user_id"),
    (json.dumps({**GOOD, "user_id": True}), "bad_user_id"),
    (json.dumps({**GOOD, "user_id": "u" * 300}), "bad_user_id"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "event_type"}), "missing_event_type"),
    (json.dumps({**GOOD, "ts": "yesterday"}), "bad_ts"),
    (json.dumps({**GOOD, "ts": "2024-03-13T10:00:00"}), "no time zone"),
    (json.dumps({**GOOD, "ts": 1710325412}), "ts_out_of_range"),  # seconds, not ms
    (json.dumps({**GOOD, "ts": "2999-01-01T00:00:00Z"}), "ts_out_of_range"),
    ('{"user_id": "u-zed", "event_type": "x", "ts": 1e400}', "finite"),  # JSON says infinity
    ('{"user_id": "u-zed", "event_type": "x", "ts": NaN}', "finite"),
    (json.dumps({**GOOD, "ts": "²³"}), "bad_ts"),
    (json.dumps({**GOOD, "properties": ["a"]}), "bad_properties"),
    (json.dumps({**GOOD, "properties": {"a": {"b": 1}}}), "bad_properties"),
    (json.dumps({**GOOD, "properties": {f"k{i}": "v" for i in range(65)}}), "oversized"),
    (json.dumps({**GOOD, "properties": {"k": "v" * 3000}}), "oversized"),
]


def _write_lines(path: Path, lines: list[str | bytes]) -> None:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")


def _events_with_bad_lines(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """The sample clickstream with every bad line above spliced in; returns bad line numbers."""
    good = EVENTS.read_text().splitlines()
    lines: list[str | bytes] = ["# comments and blank lines are not errors", ""]
    bad: dict[int, str] = {}
    for i, raw in enumerate(good):
        lines.append(raw)
        if i % 9 == 4 and len(bad) < len(BAD_EVENT_LINES):
            text, reason = BAD_EVENT_LINES[len(bad)]
            lines.append(text)
            bad[len(lines)] = reason
    for text, reason in BAD_EVENT_LINES[len(bad) :]:
        lines.append(text)
        bad[len(lines)] = reason
    path = tmp_path / "events.jsonl"
    _write_lines(path, lines)
    return path, bad


def _run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _skipped(stderr: str, path: Path) -> dict[int, str]:
    pattern = re.compile(rf"{re.escape(str(path))}:(\d+): skipped: (.*)")
    return {int(m.group(1)): m.group(2) for m in pattern.finditer(stderr)}


def _assert_reported(stderr: str, path: Path, bad: dict[int, str]) -> None:
    reported = _skipped(stderr, path)
    assert set(reported) == set(bad), (sorted(reported), sorted(bad))
    for line, reason in bad.items():
        assert reason in reported[line], (line, reported[line])


# ------------------------------------------------------------------ event files


def test_backtest_reports_bad_lines_and_decides_on_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, bad = _events_with_bad_lines(tmp_path)
    out = tmp_path / "decisions.jsonl"
    code, stdout, stderr = _run_cli(
        monkeypatch, capsys, "backtest", "--campaigns", str(CAMPAIGNS), "--events", str(path),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    _assert_reported(stderr, path, bad)
    assert f"bad_lines={len(bad)}" in stdout
    clean = run_backtest(read_events(EVENTS, LineErrors(str(EVENTS))), load_campaigns(CAMPAIGNS))
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == [d.to_json() for d in clean.decisions]
    assert len(got) >= 5


def test_csv_with_byte_order_mark_bad_cells_and_ragged_rows(tmp_path: Path) -> None:
    """Spreadsheet exports start with a BOM: the first column must still be ``user_id``."""
    path = tmp_path / "events.csv"
    path.write_bytes(
        b"\xef\xbb\xbfuser_id,event_type,ts,event_id,product_id\n"
        b"u1,add_to_cart,2024-03-13T10:23:32Z,e1,p9\n"  # 2: good
        b"u1,add_to_cart,2024-03-13T10:23:32Z,e2,p9,surplus\n"  # 3: extra cell
        b"u\xff1,page_view,1710325413000,e3,\n"  # 4: not UTF-8
        b",page_view,1710325413000,e4,\n"  # 5: no user
        b"u1,page_view,soon,e5,\n"  # 6: bad ts
        b'u1,page_view,1710325414000,e6,"p\n10"\n'  # 7-8: quoted newline, good
    )
    errors = LineErrors(str(path), echo=None)
    events = list(read_events(path, errors))
    assert [(e.user_id, e.event_id, e.properties) for e in events] == [
        ("u1", "e1", {"product_id": "p9"}),
        ("u1", "e6", {"product_id": "p\n10"}),
    ]
    assert dict(errors.errors).keys() == {3, 4, 5, 6}
    assert "more cells" in dict(errors.errors)[3]
    assert "not valid UTF-8" in dict(errors.errors)[4]


def test_jsonl_with_byte_order_mark_keeps_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({**GOOD, "event_id": "first"}).encode() + b"\n")
    errors = LineErrors(str(path), echo=None)
    assert [e.event_id for e in read_events(path, errors)] == ["first"]
    assert errors.errors == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=8,
)  # fmt: skip
FILE_FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@FILE_FUZZ
@given(
    obj=st.fixed_dictionaries(
        {"user_id": json_values, "event_type": json_values,
         "ts": json_values | st.sampled_from(["2024-03-13T10:00:00Z", "1710325412000", "-0",
                                              "²", float("inf"), 10**30])},
        optional={"event_id": json_values, "session_id": json_values, "properties": json_values},
    )
)  # fmt: skip
def test_any_json_object_is_an_event_or_an_event_error(obj: dict[str, Any]) -> None:
    """What ``read_parsed`` can report (a ValueError) is all a line may raise: nothing crashes."""
    try:
        parse_event(obj)
    except EventError as exc:
        assert re.fullmatch(r"[a-z_]+", exc.reason)


@FILE_FUZZ
@given(
    obj=st.fixed_dictionaries(
        {"user_id": json_values | st.just("u1"),
         "phone": json_values | st.sampled_from(["+14155550100", "+447911123456", "0"])},
        optional={k: json_values | st.text(max_size=8) | st.just("²")
                  for k in ("consent", "consent_at", "consent_source", "timezone", "first_name",
                            "locale", "attributes", "tier")},
    )
)  # fmt: skip
def test_any_json_object_is_a_contact_or_a_contact_error(obj: dict[str, Any]) -> None:
    try:
        parse_contact_row(obj)
    except ContactError as exc:
        phone = obj.get("phone")
        if isinstance(phone, str) and len(phone) > 3:
            # The message names the user id: a phone that is part of the id is no leak.
            message = str(exc).replace(str(obj.get("user_id")), "<user>")
            assert phone not in message and phone.lstrip("+") not in message


# ------------------------------------------------------------------ produce and contacts import


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    for key in [k for k in os.environ if k.startswith("NUDGEFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in worker_env(settings).items():
        if key.startswith("NUDGEFLOW_"):
            monkeypatch.setenv(key, value)


def _read_topic(settings: Settings, topic: str, expect: int) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "unused",
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    got: list[Any] = []
    try:
        for _ in range(60):
            got += [m for m in consumer.consume(500, timeout=0.25) if not m.error()]
            if len(got) >= expect:
                got += [m for m in consumer.consume(500, timeout=0.5) if not m.error()]
                break
    finally:
        consumer.close()
    return got


def test_produce_reports_bad_lines_and_sends_only_good_events(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, bad = _events_with_bad_lines(tmp_path)
    _cli_env(monkeypatch, settings)
    code, stdout, stderr = _run_cli(monkeypatch, capsys, "produce", str(path))
    assert code == 0, stderr
    _assert_reported(stderr, path, bad)
    good = list(read_events(EVENTS, LineErrors(str(EVENTS), echo=None)))
    assert f"produced {len(good)} events" in stdout and f"skipped {len(bad)} bad lines" in stdout
    codec = Codec(settings.schema_registry_url)
    sent = _read_topic(settings, settings.topic_clickstream, len(good))
    assert sorted(codec.decode_as("ClickEvent", m.value())["event_id"] for m in sent) == sorted(
        e.event_id for e in good
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["produce", "{events}", "--linger-ms", "-1"], "must be between 0 and 900000"),
        (["produce", "{events}", "--linger-ms", "5.5"], "not a whole number"),
        (["produce", "{events}", "--rate", "0"], "must be a positive number"),
        (["produce", "{events}", "--rate", "nan"], "must be a positive number"),
        (
            ["simulate", "--users", "1", "--events", "1", "--topic", "t", "--rate", "inf"],
            "must be a positive number",
        ),  # fmt: skip
        (["dispatcher", "--rate", "-30"], "must be a positive number"),
        (["webhooks", "--rate", "fast"], "not a number"),
        (["demo", "--rate", "0"], "must be a positive number"),
    ],
)
def test_rates_and_lingers_are_checked_before_anything_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """A rate of 0, nan or inf (or a negative linger) used to be taken as is: produce then
    ran unpaced, the dispatcher failed with a traceback from the rate limiter."""
    path, _ = _events_with_bad_lines(tmp_path)
    with pytest.raises(SystemExit) as exited:
        _run_cli(monkeypatch, capsys, *[a.replace("{events}", str(path)) for a in argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_contacts_import_reports_bad_rows_without_their_numbers(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ok = {"user_id": "u-ok", "phone": "+14155550123", "consent": "opted_in"}
    rows: list[str | bytes] = [
        json.dumps(ok),
        json.dumps({**ok, "user_id": "u-bad-phone", "phone": "+1415555012"}),  # 2: too short
        json.dumps({**ok, "user_id": "u-national", "phone": "4155550124"}),  # 3: no +country
        json.dumps({**ok, "user_id": ""}),  # 4
        json.dumps({**ok, "user_id": "u-consent", "consent": ["opted_in"]}),  # 5: a list
        json.dumps({**ok, "user_id": "u-consent2", "consent": "yes please"}),  # 6
        json.dumps({**ok, "user_id": "u-tz", "timezone": "Mars/Olympus_Mons"}),  # 7
        json.dumps({**ok, "user_id": "u-attrs", "attributes": ["gold"]}),  # 8
        json.dumps({**ok, "user_id": "u-at", "consent_at": "²"}),  # 9
        b'{"user_id": "u-\xff", "phone": "+14155550125"}',  # 10: not UTF-8
        "{not json",  # 11
        json.dumps(
            {**ok, "user_id": "u-ok2", "phone": "+447911123457", "first_name": "{{ 7*7 }}\u202e"}
        ),  # 12: good  # fmt: skip
    ]
    path = tmp_path / "contacts.jsonl"
    _write_lines(path, rows)
    _cli_env(monkeypatch, settings)
    code, stdout, stderr = _run_cli(
        monkeypatch, capsys, "contacts", "import", str(path), "--no-progress"
    )
    assert code == 0, stderr
    assert set(_skipped(stderr, path)) == set(range(2, 12))
    assert "imported 2 contacts" in stdout and "skipped 10 invalid row(s)" in stdout
    for number in ("4155550124", "415555012"):  # the bad numbers are never echoed
        assert number not in stderr
    codec = Codec(settings.schema_registry_url)
    got = _read_topic(settings, settings.topic_contacts, 2)
    assert sorted(m.key() for m in got) == [b"u-ok", b"u-ok2"]
    assert {codec.decode_as("ContactProfile", m.value())["first_name"] for m in got} == {
        None,
        "{{ 7*7 }}\u202e",
    }


# ------------------------------------------------------------------ campaign files

BASE: dict[str, Any] = {
    "id": "cart",
    "trigger": {"type": "absence", "start": ["add_to_cart"], "cancel": ["purchase"],
                "after": "30m"},
    "message": {"template": "Hi {{ first_name | default('there') }}, your cart is waiting"},
}  # fmt: skip
REPEAT = {"type": "repeat", "event": "product_view", "count": 3, "within": "1h"}
EVENT = {"type": "event", "event": "event_signup"}


def _with(**changes: Any) -> dict[str, Any]:
    c = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if value is None:
            c.pop(key, None)
        else:
            c[key] = value
    return c


def _trigger(**changes: Any) -> dict[str, Any]:
    return _with(trigger={**BASE["trigger"], **changes})


def _message(**changes: Any) -> dict[str, Any]:
    return _with(message={**BASE["message"], **changes})


# (case id, file content or campaign list, substrings the error must contain)
BROKEN: list[tuple[str, str | bytes | list[Any] | dict[str, Any], tuple[str, ...]]] = [
    ("yaml-syntax", "campaigns: [\n  - id: x\n", ("not valid YAML",)),
    ("yaml-tab", "campaigns:\n\t- id: x\n", ("not valid YAML",)),
    ("yaml-deep", "campaigns: " + "[" * 1_000, ("nested too deeply",)),
    ("not-utf8", b"campaigns:\n  - id: caf\xe9\n", ("not UTF-8",)),
    ("empty-file", "", ("'campaigns' list",)),
    ("a-list", "- id: cart\n", ("'campaigns' list",)),
    ("campaign-not-mapping", ["cart"], ("campaign #1", "must be a mapping")),
    ("no-id", [_with(id=None)], ("campaign #1", "id")),
    ("blank-id", [_with(id="  ")], ("campaign #1", "id")),
    ("numeric-id", [_with(id=7)], ("campaign #1", "id")),
    ("duplicate-id", [BASE, BASE], ("'cart'", "id", "used twice")),
    ("unknown-field", [_with(tigger={})], ("'cart'", "tigger")),
    ("no-trigger", [_with(trigger=None)], ("'cart'", "trigger", "required")),
    ("trigger-type", [_trigger(type="sometimes")], ("'cart'", "trigger.type")),
    ("after-word", [_trigger(after="soon")], ("'cart'", "trigger.after")),
    ("after-zero", [_trigger(after="0s")], ("'cart'", "trigger.after")),
    ("no-cancel", [_with(trigger={**BASE["trigger"], "cancel": None})],
     ("'cart'", "trigger.cancel")),
    ("start-is-cancel", [_trigger(cancel=["add_to_cart"])], ("'cart'", "trigger.cancel")),
    ("trigger-typo", [_trigger(afterr="1h")], ("'cart'", "trigger", "afterr")),
    ("repeat-count-0", [_with(trigger={**REPEAT, "count": 0})], ("'cart'", "trigger.count")),
    ("repeat-count-str", [_with(trigger={**REPEAT, "count": "3"})], ("'cart'", "trigger.count")),
    ("repeat-no-within", [_with(trigger={k: v for k, v in REPEAT.items() if k != "within"})],
     ("'cart'", "trigger.within")),
    ("event-delay-and-wait", [_with(trigger={**EVENT, "delay": "1h", "wait_until": "start"})],
     ("'cart'", "trigger", "either delay or wait_until")),
    ("event-before-alone", [_with(trigger={**EVENT, "before": "1h"})],
     ("'cart'", "trigger.before")),
    ("no-message", [_with(message=None)], ("'cart'", "message")),
    ("template-number", [_message(template=123)], ("'cart'", "message.template")),
    ("template-syntax", [_message(template="Hi {{ first_name ")],
     ("'cart'", "message.template", "syntax")),
    ("template-unknown-var", [_message(template="Use {{ coupon }} now")],
     ("'cart'", "message.template", "coupon")),
    ("template-unsafe", [_message(template="Hi {{ first_name.__class__.__mro__ }}")],
     ("'cart'", "message.template", "sandbox")),
    ("template-globals", [_message(template="{{ cycler.__init__.__globals__ }}")],
     ("'cart'", "message.template", "sandbox")),
    ("template-too-long", [{**_message(template="x" * 400), "max_segments": 1}],
     ("'cart'", "message.template", "segments")),
    ("footer-number", [_message(footer=5)], ("'cart'", "message.footer")),
    ("max-segments-0", [_with(max_segments=0)], ("'cart'", "max_segments")),
    ("max-segments-str", [_with(max_segments="two")], ("'cart'", "max_segments")),
    ("enabled-yes-string", [_with(enabled="yes")], ("'cart'", "enabled")),
    ("priority-word", [_with(priority="high")], ("'cart'", "priority")),
    ("audience-stage", [_with(audience={"stage": "vip"})], ("'cart'", "audience.stage")),
    ("audience-days", [_with(audience={"stage": "inactive"})], ("'cart'", "audience.days")),
    ("caps-zero", [_with(caps=[{"max": 0, "per": "1h"}])], ("'cart'", "caps")),
    ("quiet-hours", [_with(quiet_hours={"from": "25:00", "to": "09:00"})],
     ("'cart'", "quiet_hours")),
    ("max-defer", [_with(max_defer="forever")], ("'cart'", "max_defer")),
    ("holdout", [_with(holdout="150%")], ("'cart'", "holdout")),
    ("variants-dup", [_with(variants=[{"id": "a"}, {"id": "a"}])], ("'cart'", "variants")),
    ("variants-weight", [_with(variants=[{"id": "a", "weight": 0}])],
     ("'cart'", "variants[0].weight")),
    ("attribution-key", [_with(attribution={"after_view": "1h"})], ("'cart'", "attribution")),
    ("conversion-empty", [_with(conversion=[])], ("'cart'", "conversion")),
    ("second-campaign", [BASE, _with(id="browse", trigger={**REPEAT, "within": "often"})],
     ("'browse'", "trigger.within")),
    ("global-caps", {"caps": [{"max": "one", "per": "1h"}], "campaigns": [BASE]},
     ("campaign file", "caps")),
]  # fmt: skip


def _campaign_file(tmp_path: Path, content: str | bytes | list[Any] | dict[str, Any]) -> Path:
    path = tmp_path / "campaigns.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        doc = content if isinstance(content, dict) else {"campaigns": content}
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


@pytest.mark.parametrize("content, expected", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_campaign_file_fails_backtest_at_load(
    content: str | bytes | list[Any] | dict[str, Any],
    expected: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _campaign_file(tmp_path, content)
    code, stdout, stderr = _run_cli(
        monkeypatch, capsys, "backtest", "--campaigns", str(path), "--events", str(EVENTS)
    )
    assert code == 2, (stdout, stderr)
    assert stdout == ""  # nothing was replayed
    assert stderr.startswith("nudgeflow backtest: ") and "Traceback" not in stderr, stderr
    for part in expected:
        assert part in stderr, stderr


def test_the_base_campaign_is_valid(tmp_path: Path) -> None:
    """Guard: each broken case above breaks only what it says."""
    assert [c.id for c in load_campaigns(_campaign_file(tmp_path, [BASE])).campaigns] == ["cart"]


def test_broken_campaign_file_stops_every_command_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _campaign_file(tmp_path, [_trigger(after="soon")])
    for argv in (
        ["dispatcher", "--campaigns", str(path)],
        ["demo", "--campaigns", str(path), "--out", str(tmp_path / "demo")],
    ):
        code, _out, stderr = _run_cli(monkeypatch, capsys, *argv)
        assert code == 2, (argv, stderr)
        assert "campaign 'cart': trigger.after" in stderr
    # the installed entry point, as a user runs it
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("nudgeflow")), "backtest", "--campaigns", str(path),
         "--events", str(EVENTS)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("nudgeflow backtest: campaign 'cart': trigger.after: ")
    assert "Traceback" not in proc.stderr


def test_guarantees_doc_cites_only_tests_that_exist() -> None:
    """docs/guarantees.md names the tests behind each guarantee; a rename must not orphan one."""
    doc = (REPO_ROOT / "docs" / "guarantees.md").read_text()
    refs = re.findall(r"`tests/([\w/]+\.py)(?:::(\w+))?", doc)
    assert len(refs) >= 30
    for name, test in refs:
        source = (REPO_ROOT / "tests" / name).read_text()
        assert not test or re.search(rf"^(async )?def {test}\(", source, re.M), (name, test)
