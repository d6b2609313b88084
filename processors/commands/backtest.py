"""``nudgeflow backtest``: the same engine as the Faust worker, over a file, in event time.

The file's order is the arrival order (as ``nudgeflow produce`` would send it), end of input
flushes every pending timer, and decisions withdrawn after reordering are left out, so the output
equals what the live path decides for the same input.

Users never share state, so ``--workers N`` splits them over N processes by a hash of the user
id (each reads the whole file and keeps its own users' lines, in file order) and merges the
results: the same answers as one process, in the same order.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import sys
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processors.core.campaign import CampaignError, CampaignSet, load_campaigns
from processors.core.decision import Decision, DecisionCancelled
from processors.core.engine import Engine, UserState, flush_all
from processors.core.events import ClickEvent, parse_csv_row, parse_event
from processors.files import LineErrors, is_csv, read_rows
from processors.settings import Settings


@dataclass
class BacktestResult:
    decisions: list[Decision] = field(default_factory=list)  # final, sorted by (fire_at, id)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    events: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), by line

    @property
    def bad_lines(self) -> int:
        return len(self.bad)


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
    result.cancellations.sort(key=lambda c: (c.at, c.decision_id, c.reason))
    return result


def backtest_file(
    path: Path,
    campaigns_path: Path,
    *,
    allowed_lateness_ms: int = 30_000,
    workers: int = 1,
    progress: bool = False,
) -> BacktestResult:
    """The backtest of a JSON Lines or CSV file over ``workers`` processes. Bad lines go to
    ``result.bad`` and to stderr (``FILE:LINE: skipped: reason``): as they come with one process,
    in line order at the end with several."""
    if workers <= 1:
        return _share(path, campaigns_path, allowed_lateness_ms, 0, 1, progress)
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(_share, path, campaigns_path, allowed_lateness_ms, i, workers, progress)
            for i in range(workers)
        ]
        shares = [f.result() for f in futures]
    merged = BacktestResult()
    for share in shares:
        merged.decisions.extend(share.decisions)
        merged.cancellations.extend(share.cancellations)
        merged.rejected.update(share.rejected)
        merged.events += share.events
        merged.bad.extend(share.bad)
    merged.decisions.sort(key=lambda d: (d.fire_at, d.decision_id))
    merged.cancellations.sort(key=lambda c: (c.at, c.decision_id, c.reason))
    merged.bad.sort()
    report = LineErrors(str(path))
    for line, reason in merged.bad:
        report.add(line, reason)
    return merged


def owner(user_id: Any, workers: int) -> int:
    """Which of ``workers`` processes backtests this raw ``user_id`` (0 for one it rejects)."""
    if isinstance(user_id, int | float) and not isinstance(user_id, bool):
        user_id = str(user_id)  # as the event parser reads it
    if not isinstance(user_id, str) or not user_id:
        return 0
    return zlib.crc32(user_id.encode("utf-8", "replace")) % workers


def _share(
    path: Path, campaigns_path: Path, lateness_ms: int, index: int, workers: int, progress: bool
) -> BacktestResult:
    """One process's part: the users :func:`owner` gives it, in file order."""
    campaigns = load_campaigns(campaigns_path)
    # One process reports as it goes; several return theirs to the parent, which reports them.
    errors = LineErrors(str(path)) if workers == 1 else LineErrors(str(path), echo=None)
    # An undecodable line has no user: the first process alone reports it.
    unreadable = errors if index == 0 else LineErrors(str(path), echo=None)
    rows: Iterable[tuple[int, dict[str, Any]]] = read_rows(path, unreadable)
    if progress and index == 0:
        from tqdm import tqdm  # only for a terminal: not imported otherwise

        rows = tqdm(rows, desc="backtest", unit="line", file=sys.stderr)
    with _long_lived_heap():
        result = run_backtest(
            _owned(rows, is_csv(path), index, workers, errors),
            campaigns,
            allowed_lateness_ms=lateness_ms,
        )
    result.bad = sorted(errors.errors)
    return result


@contextmanager
def _long_lived_heap() -> Iterator[None]:
    """No garbage collection while the states grow: the backtest makes no reference cycles
    (``tests/unit/processors/test_backtest_gc.py``), so a collection would only walk the
    states, again and again, to free nothing. What is loaded before (modules, the campaigns) is
    frozen out of the collections that follow (ADR 0034)."""
    enabled = gc.isenabled()
    ours = gc.get_freeze_count() == 0  # a caller's own frozen objects stay frozen
    if ours:
        gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if ours:
            gc.unfreeze()


def _owned(
    rows: Iterable[tuple[int, dict[str, Any]]],
    csv_rows: bool,
    index: int,
    workers: int,
    errors: LineErrors,
) -> Iterator[ClickEvent]:
    parse = parse_csv_row if csv_rows else parse_event
    for line, obj in rows:
        if workers > 1 and owner(obj.get("user_id"), workers) != index:
            continue
        try:
            yield parse(obj)
        except ValueError as exc:
            errors.add(line, str(exc))


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
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes to spread the users over (default: every core this process may use)",
    )


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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
    if args.workers < 0:
        print("nudgeflow backtest: --workers must be 0 (every core) or more", file=sys.stderr)
        return 2
    result = backtest_file(
        args.events,
        args.campaigns,
        allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
        workers=args.workers or default_workers(),
        progress=sys.stderr.isatty(),  # a bar is for a person watching, not for a log file
    )
    if args.out:
        with args.out.open("w", encoding="utf-8") as fh:
            for d in result.decisions:
                fh.write(json.dumps(d.to_json()) + "\n")
    print(summary_table(result.decisions, campaigns))
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(result.rejected.items())) or "none"
    print(
        f"events={result.events} bad_lines={result.bad_lines} decisions={len(result.decisions)} "
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
