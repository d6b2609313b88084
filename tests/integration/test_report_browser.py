"""The report as a reader sees it: ``report.html`` opened in headless Chromium (DevTools protocol).

No console errors, every chart image loads and has ink on it, and the lift table shows every
campaign that has both texts and a holdout, with its interval. A control page proves the checks
see a broken image, a blank image and a console error.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path

import pytest

from processors.browser import BrowserError, check_page, find_chromium
from processors.report.build import write_dir_report
from processors.report.page import read_report_data
from tests.unit.processors.test_report import build_dir

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (make chromium)"
)

TIMEOUT_S = 60.0

LIFT_ROWS_JS = """
Array.from(document.querySelectorAll('#lift tbody tr')).map((tr) => ({
  campaign: tr.dataset.campaign, hasLift: tr.dataset.hasLift === 'true',
  lift: tr.querySelector('[data-figure="lift"]').innerText,
  visible: tr.getBoundingClientRect().height > 0,
}))
"""


def _check(page: Path, expressions: dict[str, str] | None = None) -> object:
    return asyncio.run(asyncio.wait_for(check_page(page, expressions), TIMEOUT_S))


def _png(colour: tuple[int, int, int], line: bool) -> str:
    """A small PNG of one colour, with a dark line drawn across it or not."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), facecolor=tuple(c / 255 for c in colour))
    FigureCanvasAgg(fig)
    if line:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.plot([0, 1], [0, 1], color="black", linewidth=6)
        ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    return base64.b64encode(buf.getvalue()).decode()


def test_report_opens_cleanly_with_every_chart_drawn_and_the_lift_table(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    build_dir(directory)
    users = sorted(
        set(re.findall(r'"user_id": "([^"]+)"', (directory / "decisions.jsonl").read_text()))
    )
    zones = ["America/New_York", "Europe/London", "Asia/Kolkata"]
    (directory / "zones.jsonl").write_text(
        "".join(
            json.dumps({"user_id": u, "timezone": zones[i % 3]}) + "\n" for i, u in enumerate(users)
        )  # fmt: skip
    )
    page = write_dir_report(directory)
    data = read_report_data(page.read_text())
    charts = page.read_text().count('src="data:image/png;base64,')
    assert charts >= 5  # funnel, lift, trigger-to-send, local hours, UTC hours, trends

    seen = _check(page, {"lift": LIFT_ROWS_JS, "h1": "document.querySelector('h1').innerText"})

    assert seen.console_errors == []  # type: ignore[attr-defined]
    assert seen.title == "NudgeFlow report"  # type: ignore[attr-defined]
    images = seen.images  # type: ignore[attr-defined]
    assert len(images) == charts
    for img in images:
        assert img["complete"] and img["width"] > 100 and img["height"] > 100, img["alt"]
        assert img["ink"] > 50, f"chart {img['alt']!r} is blank"
    # the lift table: every campaign with texts and a holdout shows its lift with an interval
    rows = {r["campaign"]: r for r in seen.values["lift"]}  # type: ignore[attr-defined]
    with_holdout = {c["campaign_id"] for c in data["campaigns"] if c["sent"] and c["holdout"]}
    assert with_holdout, "the fixture must have a campaign with a holdout"
    assert set(rows) == {c["campaign_id"] for c in data["campaigns"]}
    for cid, r in rows.items():
        assert r["visible"], cid
        assert r["hasLift"] == (cid in with_holdout), cid
        if cid in with_holdout:
            assert r["lift"].endswith("]") and " pp [" in r["lift"], r["lift"]
        else:
            assert r["lift"] and "n/a" not in r["lift"], r["lift"]  # says why, in words


def test_the_checks_see_broken_and_blank_images_and_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><head><title>t</title></head><body>"
        f'<img id="drawn" alt="drawn" src="data:image/png;base64,{_png((255, 255, 255), True)}">'
        f'<img id="blank" alt="blank" src="data:image/png;base64,{_png((240, 240, 255), False)}">'
        '<img id="broken" alt="broken" src="data:image/png;base64,bm90IGEgcG5n">'
        "<script>console.error('boom')</script></body></html>"
    )
    seen = _check(page)
    by_id = {i["id"]: i for i in seen.images}  # type: ignore[attr-defined]
    assert by_id["drawn"]["complete"] and by_id["drawn"]["ink"] > 50
    assert by_id["blank"]["complete"] and by_id["blank"]["width"] > 100
    assert by_id["blank"]["ink"] == 0
    assert by_id["broken"]["width"] == 0
    assert any("boom" in e for e in seen.console_errors)  # type: ignore[attr-defined]


def test_a_missing_browser_is_a_clear_error(tmp_path: Path) -> None:
    from processors.browser import Chromium

    async def go() -> None:
        async with Chromium(binary=str(tmp_path / "no-such-chromium"), timeout_s=5):
            pass

    with pytest.raises(BrowserError, match="could not be started"):
        asyncio.run(go())
