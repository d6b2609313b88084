"""``nudgeflow backtest`` against a bare ``json.loads`` pass over the same JSON Lines file.

An analyst backtests months of clickstream before enabling a campaign; the figure says how close
the backtest comes to the speed of reading the file at all. A synthetic file
(``processors.simulate.generate``, canonical JSON with ISO times) is written once; then, on one
core, the best of two bare passes (``for line in f: json.loads(line)``) and one
``nudgeflow backtest --workers 1`` subprocess over every example campaign (file reading, event
validation, the engine, the end-of-input flush and its summary; interpreter start-up included);
then the same with ``--workers`` left at every core.

Prints ``backtest_events_per_s``, ``json_events_per_s``, ``backtest_ratio`` (the first over
the second) and ``backtest_all_cores_events_per_s``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from trigger_throughput import BenchError, run_main, say

from processors.settings import REPO_ROOT
from processors.simulate import generate

CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def json_pass(path: Path) -> float:
    """Seconds of one bare pass over ``path``."""
    loads = json.loads
    started = time.perf_counter()
    with path.open("rb") as fh:
        for line in fh:
            loads(line)
    return time.perf_counter() - started


def run(args: argparse.Namespace, tmp: Path) -> list[tuple[str, str]]:
    path = tmp / "events.jsonl"
    t = time.perf_counter()
    with path.open("w", encoding="utf-8") as fh:
        for event in generate(args.users, args.events, args.seed):
            fh.write(json.dumps(event.to_json(), separators=(",", ":")) + "\n")
    say(f"wrote {args.events} events in {time.perf_counter() - t:.1f} s")
    bare = min(json_pass(path) for _ in range(2))
    exe = Path(sys.executable).with_name("nudgeflow")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "processors.cli"]
    elapsed = backtest(argv, path, tmp, args.events, "--workers", "1")
    all_cores = backtest(argv, path, tmp, args.events)
    backtest_rate, json_rate = args.events / elapsed, args.events / bare
    say(f"backtest {backtest_rate:,.0f} events/s, bare json.loads {json_rate:,.0f} events/s")
    say(f"backtest on every core {args.events / all_cores:,.0f} events/s")
    return [
        ("backtest_events_per_s", f"{backtest_rate:.0f}"),
        ("json_events_per_s", f"{json_rate:.0f}"),
        ("backtest_ratio", f"{backtest_rate / json_rate:.3f}"),
        ("backtest_all_cores_events_per_s", f"{args.events / all_cores:.0f}"),
    ]


def backtest(argv: list[str], path: Path, tmp: Path, events: int, *extra: str) -> float:
    """Seconds of one ``nudgeflow backtest`` subprocess over ``path``."""
    started = time.perf_counter()
    run = subprocess.run(
        [*argv, "backtest", "--campaigns", str(CAMPAIGNS), "--events", str(path), *extra],
        cwd=tmp, capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        raise BenchError(f"nudgeflow backtest exited {run.returncode}: {run.stderr[-500:]}")
    summary = run.stdout.strip().splitlines()[-1]
    if f"events={events}" not in summary:
        raise BenchError(f"nudgeflow backtest did not read every event: {summary}")
    say(f"backtest {' '.join(extra) or '(every core)'}: {summary}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    return run_main("backtest_speed", run, parse_args(argv), (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
