"""``nudgeflow report``: the figures in the page equal counts taken straight from the JSON Lines
files, for a hand-made directory and for a real ``nudgeflow demo`` run."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter, defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from processors.commands.cli import main
from processors.core.campaign import load_campaigns
from processors.core.events import iso_ms, parse_ts
from processors.demo.run import EXAMPLES, run_demo
from processors.report.build import write_dir_report
from processors.report.page import DATA_ID, read_report_data
from processors.report.stats import newcombe, wilson

H = 3_600_000
D = 24 * H
WEEK1 = 1_709_546_400_000  # 2024-03-04T10:00:00Z, a Monday

CAMPAIGNS = """
campaigns:
  - id: cart
    trigger: {type: absence, start: [add_to_cart], cancel: [purchase], after: 30m}
    message: {template: "Your cart is waiting"}
    variants:
      - {id: quick, weight: 50, after: 15m}
      - {id: patient, weight: 50, after: 60m}
    holdout: 20%
  - id: form
    trigger: {type: absence, start: [form_start], cancel: [form_submit], after: 20m}
    message: {template: "Finish your form"}
    attribution: {after_send: 2h}
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text().splitlines():
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


# ------------------------------------------------------------------ statistics


def test_intervals_match_published_values() -> None:
    # Newcombe (1998), Stat Med 17:857 — Wilson 81/263 and method 10 for 56/70 - 48/80
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    d, low, high = newcombe(56, 70, 48, 80)
    assert (round(d, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)
    d, low, high = newcombe(0, 10, 0, 20)  # Wald would give [0, 0]
    assert d == 0 and low < 0 < high


# ------------------------------------------------------------------ a hand-made directory


class Builder:
    """Writes a demo-shaped directory and remembers which decisions must convert."""

    def __init__(self) -> None:
        self.decisions: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.deliveries: list[dict[str, Any]] = []
        self.expect_converted: set[str] = set()
        self.n = 0

    def ev(self, user: str, kind: str, ts: int, **props: str) -> str:
        eid = f"e{len(self.events)}"
        self.events.append({"event_id": eid, "user_id": user, "event_type": kind,
                            "ts": iso_ms(ts), "properties": props})  # fmt: skip
        return eid

    def text(
        self,
        campaign: str,
        variant: str | None,
        at: int,
        status: str = "sent",
        reason: str | None = None,
        deferred: bool = False,
        buy_after: int | None = None,
        value: str | None = None,
        click_after: int | None = None,
        convert: bool = False,
    ) -> str:
        self.n += 1
        user, did = f"u{self.n}", f"d-{self.n}"
        start = "add_to_cart" if campaign == "cart" else "form_start"
        trigger = self.ev(user, start, at - 30 * 60_000)
        self.decisions.append({"decision_id": did, "campaign_id": campaign, "user_id": user,
                               "fire_at": iso_ms(at), "trigger_event_ids": [trigger],
                               "variant": variant, "stage": None, "priority": 0})  # fmt: skip
        base = {"decision_id": did, "campaign_id": campaign, "user_id": user, "variant": variant}
        if deferred:
            self.outcomes.append({**base, "status": "deferred", "reason": "quiet_hours",
                                  "at": iso_ms(at - H), "due_at": iso_ms(at)})  # fmt: skip
        if status != "pending":
            self.outcomes.append({**base, "status": status, "reason": reason, "at": iso_ms(at)})
        if click_after is not None:
            self.ev(user, "sms_link_click", at + click_after, decision_id=did)
        if buy_after is not None:
            kind = "purchase" if campaign == "cart" else "form_submit"
            props = {"value": value} if value is not None else {}
            self.ev(user, kind, at + buy_after, **props)
        if convert:
            self.expect_converted.add(did)
        return did

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "campaigns.yaml").write_text(CAMPAIGNS)
        for name, rows in (("decisions", self.decisions), ("outcomes", self.outcomes),
                           ("events", self.events), ("deliveries", self.deliveries)):  # fmt: skip
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (directory / f"{name}.jsonl").write_text(text)
        with (directory / "decisions.jsonl").open("a") as fh:
            fh.write("{broken line\n")
        with (directory / "deliveries.jsonl").open("a") as fh:
            fh.write(json.dumps({"status": "delivered"}) + "\n")  # no decision id: skipped


def build_dir(directory: Path) -> Builder:
    b = Builder()
    # cart / quick over three weeks: 3 of 4, 3 of 4, then 1 of 4 convert -> flagged falling
    for week, converting in ((0, 3), (1, 3), (2, 1)):
        for i in range(4):
            at = WEEK1 + week * 7 * D + i * H
            yes = i < converting
            did = b.text("cart", "quick", at, buy_after=2 * H if yes else 30 * H,
                         value=f"{10 + i}.50", convert=yes)  # fmt: skip
            b.deliveries.append({"decision_id": did, "status": "accepted"})
            b.deliveries.append({"decision_id": did, "status": "delivered" if i else "failed"})
    # cart / patient: a click keeps the text eligible for 5 days; a late buy without one doesn't
    b.text("cart", "patient", WEEK1 + 2 * H, click_after=D, buy_after=3 * D, convert=True)
    b.text("cart", "patient", WEEK1 + 3 * H, buy_after=3 * D, value="99")
    b.text("cart", "patient", WEEK1 + 4 * H, deferred=True, buy_after=H, value="5", convert=True)
    b.text("cart", "patient", WEEK1 + 5 * H, deferred=True, status="pending")
    b.text("cart", "patient", WEEK1 + 6 * H, status="failed", reason="gateway_error")
    # the holdout of both variants: converted the same way against the suppressed decision
    b.text("cart", "quick", WEEK1 + 7 * H, "suppressed", "holdout", buy_after=H, value="20",
           convert=True)  # fmt: skip
    b.text("cart", "quick", WEEK1 + 8 * H, "suppressed", "holdout")
    b.text("cart", "patient", WEEK1 + 9 * H, "suppressed", "holdout", buy_after=2 * H,
           convert=True)  # fmt: skip
    b.text("cart", "patient", WEEK1 + 10 * H, "suppressed", "opted_out", buy_after=H)
    # form: attribution after_send is 2 h there
    b.text("form", None, WEEK1 + 11 * H, buy_after=H, convert=True)
    b.text("form", None, WEEK1 + 12 * H, buy_after=3 * H)
    b.text("form", None, WEEK1 + 13 * H, "suppressed", "frequency_cap")
    b.write(directory)
    return b


def expected_from_files(directory: Path) -> dict[tuple[str, str | None], dict[str, Any]]:
    """The report's figures, counted directly from the JSON Lines files (no NudgeFlow code)."""
    decisions = {d["decision_id"]: d for d in _lines(directory / "decisions.jsonl")}
    final: dict[str, dict[str, Any]] = {}
    for o in _lines(directory / "outcomes.jsonl"):
        if o["status"] != "deferred":
            final[o["decision_id"]] = o
    conversions = _lines(directory / "conversions.jsonl")
    won: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in conversions:
        won[c["decision_id"]].append(c)
    delivered = set()
    if (directory / "deliveries.jsonl").exists():
        delivered = {r["decision_id"] for r in _lines(directory / "deliveries.jsonl")
                     if r.get("status") == "delivered" and r.get("decision_id")}  # fmt: skip
    clicked = {e["properties"].get("decision_id") for e in _lines(directory / "events.jsonl")
               if e["event_type"] == "sms_link_click"}  # fmt: skip
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for did, d in decisions.items():
        r = rows.setdefault((d["campaign_id"], d["variant"]), {
            "decisions": 0, "sent": 0, "suppressed": Counter(), "delivered": 0, "clicked": 0,
            "converted": 0, "holdout": 0, "holdout_converted": 0, "revenue": Decimal(0),
            "hours": [0] * 24,
        })  # fmt: skip
        r["decisions"] += 1
        if did not in final:
            continue
        o = final[did]
        if o["status"] == "suppressed":
            r["suppressed"][o["reason"]] += 1
        if o["status"] == "suppressed" and o["reason"] == "holdout":
            r["holdout"] += 1
            r["holdout_converted"] += bool(won[did])
        if o["status"] != "sent":
            continue
        r["sent"] += 1
        r["delivered"] += did in delivered
        r["clicked"] += did in clicked
        r["converted"] += bool(won[did])
        r["revenue"] += sum(Decimal(c["revenue"]) for c in won[did] if c["revenue"])
        r["hours"][datetime.fromtimestamp(parse_ts(o["at"]) / 1000, UTC).hour] += 1
    return rows


def check_page(directory: Path, page: str) -> dict[str, Any]:
    """Every row's figures (JSON block and table cells) equal the counts from the files."""
    data = read_report_data(page)
    expected = expected_from_files(directory)
    got = {(r["campaign_id"], r["variant"]): r for r in data["rows"]}
    assert set(got) == set(expected)
    for key, exp in expected.items():
        r = got[key]
        assert r["decisions"] == exp["decisions"], key
        assert r["sent"] == exp["sent"], key
        assert r["suppressed"] == dict(exp["suppressed"]), key
        assert r["converted"] == exp["converted"], key
        assert r["holdout"] == exp["holdout"] and r["holdout_converted"] == exp["holdout_converted"]
        assert Decimal(r["revenue"]) == exp["revenue"], key
        assert r["sends_by_hour"] == exp["hours"], key
        if data["known"]["deliveries"]:
            assert r["delivered"] == exp["delivered"], key
        assert r["clicked"] == exp["clicked"], key
        if exp["sent"]:
            rate = exp["converted"] / exp["sent"]
            assert r["conversion_rate"] == pytest.approx(rate), key
        else:
            assert r["conversion_rate"] is None, key
        if exp["sent"] and exp["holdout"]:
            lift = rate - exp["holdout_converted"] / exp["holdout"]
            assert r["lift"]["diff"] == pytest.approx(lift), key
            assert r["lift"]["low"] < r["lift"]["diff"] < r["lift"]["high"], key
        else:
            assert r["lift"] is None, key
        # the visible table carries the same numbers
        tr = re.search(
            rf'<tr class="" data-campaign="{key[0]}" data-variant="{key[1] or ""}">(.*?)</tr>', page
        )
        assert tr is not None, key
        cells = dict(re.findall(r'data-figure="(\w+)" data-value="([^"]*)"', tr.group(1)))
        assert int(cells["sent"]) == exp["sent"] and int(cells["decisions"]) == exp["decisions"]
        assert cells["converted"] == str(exp["converted"])
    return data


def test_report_of_a_hand_made_directory(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    built = build_dir(directory)
    assert main(["report", "--from", str(directory)]) == 0
    page = (directory / "report.html").read_text()
    assert not re.search(r'src="(?!data:)', page)  # self-contained: no external resources
    assert page.count('src="data:image/png;base64,') >= 3
    assert not (directory / "conversions.jsonl").exists()  # `report` writes only the page
    write_dir_report(directory)  # what the demo calls: page + conversions.jsonl
    conversions = _lines(directory / "conversions.jsonl")
    assert {c["decision_id"] for c in conversions} == built.expect_converted
    data = check_page(directory, (directory / "report.html").read_text())
    rows = {(r["campaign_id"], r["variant"]): r for r in data["rows"]}
    quick, patient = rows[("cart", "quick")], rows[("cart", "patient")]
    # hand-checked values
    assert (quick["sent"], quick["converted"], quick["holdout"]) == (12, 7, 2)
    assert quick["revenue"] == "79.50"  # 10.50 + 11.50 + 12.50 twice, 10.50 once
    assert quick["delivered"] == 9 and quick["clicked"] == 0
    assert patient["not_sent"] == {"failed:gateway_error": 1, "pending:": 1,
                                   "suppressed:holdout": 1, "suppressed:opted_out": 1}  # fmt: skip
    assert (patient["sent"], patient["converted"], patient["clicked"]) == (3, 2, 1)
    assert patient["median_trigger_to_send_s"] == 1800
    assert rows[("form", None)]["converted"] == 1  # the 3 h one is past form's 2 h window
    totals = {c["campaign_id"]: c for c in data["campaigns"]}
    assert totals["cart"]["has_variants"] and totals["cart"]["sent"] == 15
    assert totals["cart"]["holdout_converted"] == 2 and not totals["form"]["has_variants"]
    trends = {t["campaign_id"]: t for t in data["trends"]}
    assert trends["cart"]["falling"] and not trends["form"]["falling"]
    assert [w["sent"] for w in trends["cart"]["weeks"]] == [7, 4, 4]
    assert 'data-campaign="cart" data-falling="true"' in (directory / "report.html").read_text()
    assert any("decisions.jsonl:" in n for n in data["notes"])  # the broken line is reported
    assert any("deliveries.jsonl:" in n for n in data["notes"])


def test_report_without_events_or_receipts_says_why_in_words(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    build_dir(directory)
    (directory / "events.jsonl").unlink()
    (directory / "deliveries.jsonl").unlink()
    out = tmp_path / "r.html"
    assert main(["report", "--from", str(directory), "--out", str(out)]) == 0
    page = out.read_text()
    data = read_report_data(page)
    assert data["known"] == {"conversions": False, "clicks": False, "deliveries": False,
                             "zones": False, "opt_outs": False}  # fmt: skip
    row = data["rows"][0]
    assert row["converted"] is None and row["delivered"] is None and row["lift"] is None
    assert row["sent"] > 0
    assert row["lift_why"] == "conversions unknown: no events to attribute them with"
    # unknown columns are left out of the table and the page says why, in words
    assert 'data-figure="delivered"' not in page and 'data-figure="converted"' not in page
    assert "Not in this table, and why: delivered: no delivery receipts" in page
    assert "n/a" not in page.split(f'id="{DATA_ID}"')[0]


def test_report_of_a_missing_directory_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--from", str(tmp_path / "nope")]) == 2
    assert "decisions.jsonl: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------ the real demo


def _oracle(directory: Path) -> set[tuple[str, str]]:
    """Last touch, 24 h windows, no clicks: (conversion event id, decision id), brute force."""
    kinds = {
        c.id: c.conversion_events for c in load_campaigns(directory / "campaigns.yaml").campaigns
    }
    touches = []
    final: dict[str, dict[str, Any]] = {}
    for o in _lines(directory / "outcomes.jsonl"):
        if o["status"] != "deferred":
            final[o["decision_id"]] = o
    for o in final.values():
        if o["status"] == "sent" or o["reason"] == "holdout":
            touches.append((parse_ts(o["at"]), o["decision_id"], o["user_id"], o["campaign_id"]))
    out = set()
    for e in _lines(directory / "events.jsonl"):
        ts = parse_ts(e["ts"])
        covering = [
            t
            for t in touches
            if t[2] == e["user_id"] and t[0] <= ts <= t[0] + D and e["event_type"] in kinds[t[3]]
        ]
        if covering:
            out.add((e["event_id"], max(covering)[1]))
    return out


@pytest.mark.integration
def test_report_of_a_real_demo_run(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    # purchases after the sample's texts: some within 24 h, one far too late. (Purchases that
    # cancel a trigger are left out: in an event-time replay they would exit its held send.)
    extra = [
        {"event_id": "buy-chloe", "user_id": "u-chloe", "event_type": "purchase",
         "ts": "2024-03-14T09:00:00Z", "properties": {"value": "80"}},
        {"event_id": "buy-gia", "user_id": "u-gia", "event_type": "purchase",
         "ts": "2024-03-14T09:30:00Z", "properties": {"value": "10.25"}},
        {"event_id": "buy-farid", "user_id": "u-farid", "event_type": "purchase",
         "ts": "2024-03-14T10:00:00Z", "properties": {"value": "35.00"}},
        {"event_id": "buy-gia-late", "user_id": "u-gia", "event_type": "purchase",
         "ts": "2024-03-20T12:00:00Z", "properties": {"value": "10"}},
    ]  # fmt: skip
    shutil.copy(EXAMPLES / "events.jsonl", events)
    with events.open("a") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in extra)
    out = tmp_path / "out"
    assert run_demo(events, EXAMPLES / "campaigns.yaml", EXAMPLES / "contacts.jsonl", out) == 0
    page = (out / "report.html").read_text()
    assert (out / "events.jsonl").exists() and (out / "campaigns.yaml").exists()
    conversions = _lines(out / "conversions.jsonl")
    assert {(c["event_id"], c["decision_id"]) for c in conversions} == _oracle(out)
    assert {c["event_id"] for c in conversions} == {"buy-chloe", "buy-gia", "buy-farid"}
    data = check_page(out, page)
    # sent texts are exactly the outbox, per campaign and hour
    outbox = _lines(out / "outbox.jsonl")
    by_campaign = Counter(m["campaign_id"] for m in outbox)
    sent: Counter[str] = Counter()
    for r in data["rows"]:
        sent[r["campaign_id"]] += r["sent"]
    assert +sent == by_campaign
    hours = [0] * 24
    for m in outbox:
        hours[datetime.fromtimestamp(parse_ts(m["sent_at"]) / 1000, UTC).hour] += 1
    assert [sum(h) for h in zip(*(r["sends_by_hour"] for r in data["rows"]), strict=True)] == hours
    # the report can be rebuilt from the directory alone, with the same figures
    again = tmp_path / "again.html"
    assert main(["report", "--from", str(out), "--out", str(again)]) == 0
    assert read_report_data(again.read_text())["rows"] == data["rows"]
