"""Build the report page from an input, and write it into a demo directory."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from processors.core.attribution import (
    Conversion,
)
from processors.files import LineErrors, read_events
from processors.report.figures import compute
from processors.report.inputs import ReportInput
from processors.report.page import render_html
from processors.report.plots import plots
from processors.report.sources import load_dir


def build(data: ReportInput) -> str:
    """The whole HTML page of ``data``."""
    fig_data = compute(data)
    return render_html(fig_data, plots(fig_data))


def write_conversions(path: Path, conversions: Iterable[Conversion]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for c in conversions:
            fh.write(json.dumps(c.to_json()) + "\n")


def write_dir_report(
    directory: Path, events: Path | None = None, campaigns: Path | None = None
) -> Path:
    """``DIR/conversions.jsonl`` and ``DIR/report.html`` from a demo directory; returns the page."""
    return write_dir_report_with_figures(directory, events, campaigns)[0]


def write_dir_report_with_figures(
    directory: Path, events: Path | None = None, campaigns: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """``write_dir_report`` that also returns the figures shown (the demo's summary)."""
    data, _events = load_dir(directory, events, campaigns)
    if data.conversions is not None:
        write_conversions(directory / "conversions.jsonl", data.conversions)
    fig_data = compute(data)
    out = directory / "report.html"
    out.write_text(render_html(fig_data, plots(fig_data)), encoding="utf-8")
    return out, fig_data


def write_demo_report(directory: Path, events: Path, campaigns: Path) -> Path:
    """What ``nudgeflow demo`` adds to its directory: the input (events as canonical JSON Lines,
    whatever their format; the campaign file), so ``nudgeflow report --from DIR`` needs nothing
    else, then ``conversions.jsonl`` and ``report.html``."""
    rows = list(read_events(events, LineErrors(str(events), echo=None)))  # read before writing
    with (directory / "events.jsonl").open("w", encoding="utf-8") as fh:
        for e in rows:
            fh.write(json.dumps(e.to_json()) + "\n")
    target = directory / "campaigns.yaml"
    if campaigns.resolve() != target.resolve():
        target.write_bytes(campaigns.read_bytes())
    return write_dir_report(directory)
