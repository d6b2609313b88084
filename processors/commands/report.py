"""``nudgeflow report``: write the HTML report of a demo directory or of the topics."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from processors.core.campaign import CampaignError
from processors.report.build import build, write_conversions
from processors.report.inputs import ReportError
from processors.report.sources import load_dir, load_kafka


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from", dest="source", type=Path, metavar="DIR", help="a `nudgeflow demo` directory"
    )
    src.add_argument(
        "--from-kafka", action="store_true", help="read the topics to their current end"
    )
    parser.add_argument(
        "--events", type=Path, help="events for clicks and conversions (default DIR/events.jsonl)"
    )
    parser.add_argument(
        "--campaigns", type=Path, help="campaign file (default DIR/campaigns.yaml, else settings)"
    )
    parser.add_argument(
        "--out", type=Path, help="HTML file to write (default DIR/report.html, else report.html)"
    )
    parser.add_argument(
        "--conversions-out", type=Path, help="also write the attributed conversions (JSON Lines)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.from_kafka:
            from processors.settings import Settings

            settings = Settings.load()
            if args.campaigns is not None:
                settings = settings.model_copy(update={"campaigns_file": args.campaigns})
            data = load_kafka(settings)
            out = args.out or Path("report.html")
        else:
            data, _events = load_dir(args.source, args.events, args.campaigns)
            out = args.out or args.source / "report.html"
        page = build(data)
    except (ReportError, CampaignError) as exc:
        print(f"nudgeflow report: {exc}", file=sys.stderr)
        return 2
    out.write_text(page, encoding="utf-8")
    if args.conversions_out is not None and data.conversions is not None:
        write_conversions(args.conversions_out, data.conversions)
    print(f"report: {out}")
    return 0
