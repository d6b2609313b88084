"""``nudgeflow backtest``: the same engine as the Faust worker, over a file, in event time.

The file's order is the arrival order (as ``nudgeflow produce`` would send it), end of input
flushes every pending timer, and decisions withdrawn after reordering are left out, so the output
equals what the live path decides for the same input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from processors.core.campaign import CampaignError, CampaignSet, load_campaigns
from processors.core.decision import Decision, DecisionCancelled
from processors.core.engine import Engine, UserState, flush_all
from processors.core.events import ClickEvent
from processors.files import LineErrors, read_events
from processors.settings import Settings


@dataclass
class BacktestResult:
    decisions: list[Decision] = field(default_factory=list)  # final, sorted by (fire_at, id)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    events: int = 0


def run_backtest(
    events: Iterable[ClickEvent], campaigns: CampaignSet, *, allowed_lateness_ms: int = 30_000
) -> BacktestResult:
    engine = Engine(campaigns, allowed_lateness_ms=allowed_lateness_ms, clock_name="event")
    states: dict[str, UserState] = {}
    emitted: dict[str, Decision] = {}
    result = BacktestResult()

    def take(decisions: list[Decision], cancels: list[DecisionCancelled]) -> None:
        for d in decisions:
            emitted[d.decision_id] = d
        for c in cancels:
            if c.reason == "reordered":
                emitted.pop(c.decision_id, None)
            else:
                result.cancellations.append(c)

    for event in events:
        result.events += 1
        step = engine.on_event(states.get(event.user_id), event)
        if step.state is None:
            states.pop(event.user_id, None)
        else:
            states[event.user_id] = step.state
        take(step.decisions, step.cancellations)
        for _ev, reason in step.rejected:
            result.rejected[reason] += 1
    final = flush_all(engine, states)
    take(final.decisions, final.cancellations)
    result.decisions = sorted(emitted.values(), key=lambda d: (d.fire_at, d.decision_id))
    return result


def summary_table(decisions: list[Decision], campaigns: CampaignSet) -> str:
    """Per campaign: decisions, users reached, decisions per user, and by hour of day (UTC)."""
    by_campaign: dict[str, list[Decision]] = defaultdict(list)
    for d in decisions:
        by_campaign[d.campaign_id].append(d)
    lines = [f"{'campaign':<22}{'decisions':>10}{'users':>8}{'per user':>10}  busiest hours (UTC)"]
    for c in campaigns.campaigns:
        ds = by_campaign.get(c.id, [])
        users = len({d.user_id for d in ds})
        hours = Counter(datetime.fromtimestamp(d.fire_at / 1000, tz=UTC).hour for d in ds)
        top = ", ".join(f"{h:02d}h:{n}" for h, n in sorted(hours.items(), key=lambda x: -x[1])[:4])
        per_user = f"{len(ds) / users:.2f}" if users else "-"
        lines.append(f"{c.id:<22}{len(ds):>10}{users:>8}{per_user:>10}  {top}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaigns", type=Path, required=True, help="campaign file (YAML)")
    parser.add_argument("--events", type=Path, required=True, help="events (.jsonl or .csv)")
    parser.add_argument("--contacts", type=Path, help="contacts file: also apply the send policy")
    parser.add_argument("--out", type=Path, help="write decisions as JSON Lines here")


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    try:
        campaigns = load_campaigns(args.campaigns)
    except CampaignError as exc:
        print(f"nudgeflow backtest: {exc}", file=sys.stderr)
        return 2
    if not args.events.exists():
        print(f"nudgeflow backtest: {args.events}: no such file", file=sys.stderr)
        return 2
    errors = LineErrors(str(args.events))
    events = tqdm(read_events(args.events, errors), desc="backtest", unit="ev", file=sys.stderr)
    result = run_backtest(
        events, campaigns, allowed_lateness_ms=int(settings.allowed_lateness_s * 1000)
    )
    if args.out:
        with args.out.open("w", encoding="utf-8") as fh:
            for d in result.decisions:
                fh.write(json.dumps(d.to_json()) + "\n")
    print(summary_table(result.decisions, campaigns))
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(result.rejected.items())) or "none"
    print(
        f"events={result.events} bad_lines={len(errors)} decisions={len(result.decisions)} "
        f"cancellations={len(result.cancellations)} rejected: {rejected}"
    )
    if args.contacts:
        from processors.backtest_dispatch import dispatch_report  # the send policy, in memory

        print(
            dispatch_report(
                result.decisions, result.cancellations, campaigns, args.contacts, settings
            )
        )
    return 0
