"""``make bench``: run every benchmark in ``bench/`` with its defaults and print its figures.

Each benchmark is a script that prints ``key=value`` lines on stdout (progress on stderr) and
tears down whatever it started. They run one after another, in name order, as subprocesses, so
that one benchmark's broker, worker or memory cannot skew the next. The whole run has a time
budget (10 minutes); a benchmark still running when the budget
is spent gets SIGTERM (it then stops what it started) and the run fails.

The last line sums up the target figures from all the benchmarks' ``key=value`` lines
(``NA`` for a figure whose benchmark did not run or failed); docs/performance.md explains each.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUDGET_S = 600.0
# (summary name, benchmark key): the targets in the order docs/performance.md lists them, then
# the throughput figures per CPU-second
SUMMARY = (
    ("throughput_ratio", "ratio"),
    ("peer_ratio", "peer_ratio"),
    ("decision_p99_ms", "decision_p99_ms"),
    ("send_p99_ms", "send_p99_ms"),
    ("timer_lateness_p99_s", "timer_lateness_p99_s"),
    ("gateway_rate_ratio", "gateway_rate_ratio"),
    ("gateway_max_per_s", "gateway_max_per_s"),
    ("policy_per_s", "policy_per_s"),
    ("state_bytes_per_user", "state_bytes_per_user"),
    ("rss_growth", "rss_growth"),
    ("backtest_ratio", "backtest_ratio"),
    # per CPU-second of each process: steadier than wall clock on a shared machine
    ("cpu_ratio", "cpu_ratio"),
    ("peer_cpu_ratio", "peer_cpu_ratio"),
)


def figures(out: str) -> dict[str, str]:
    """The ``key=value`` lines of a benchmark's stdout."""
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and " " not in key:
            found[key] = value.strip()
    return found


def summary_line(found: dict[str, str]) -> str:
    return " ".join(f"{name}={found.get(key, 'NA')}" for name, key in SUMMARY)


OWN_TARGET = {"redis_memory"}
"""Benchmarks too long for the budget: run by their own make target (``make
bench-redis-memory``), or by name (``bench/run.py redis_memory``)."""

TERM_GRACE_S = 60.0  # a benchmark's teardown (worker + broker stop) takes well under this


def discover(names: list[str]) -> list[Path]:
    """Benchmark scripts in ``bench/`` (all but this file and ``_private`` ones), by name."""
    found = sorted(
        p for p in BENCH_DIR.glob("*.py") if p.name != Path(__file__).name and p.name[0] != "_"
    )
    if not names:
        return [p for p in found if p.stem not in OWN_TARGET]
    by_name = {p.stem: p for p in found}
    unknown = [n for n in names if n.removesuffix(".py") not in by_name]
    if unknown:
        raise SystemExit(
            f"bench/run.py: unknown benchmark(s) {', '.join(unknown)}; "
            f"available: {', '.join(by_name)}"
        )
    return [by_name[n.removesuffix(".py")] for n in names]


def run_one(script: Path, timeout_s: float) -> tuple[int | None, str]:
    """Run ``script`` (its stderr passes through); returns (exit code or None on timeout, stdout).

    The figures come at the end of a benchmark, so stdout is collected rather than streamed.
    """
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout_s))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        return None, ""
    finally:
        if proc.poll() is None:  # timeout or Ctrl-C: SIGTERM makes it stop what it started
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run NudgeFlow's benchmarks (bench/*.py).")
    parser.add_argument("names", nargs="*", help="only these benchmarks (default: all)")
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help=f"seconds for all (default {BUDGET_S:.0f})"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget
    failed: list[str] = []
    found: dict[str, str] = {}
    for script in discover(args.names):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(f"[bench] {script.stem}: not run, the budget is spent", file=sys.stderr)
            failed.append(script.stem)
            continue
        print(f"[bench] {script.stem}", file=sys.stderr, flush=True)
        t = time.monotonic()
        code, out = run_one(script, remaining)
        print(out, end="", flush=True)
        if code == 0:
            found.update(figures(out))
        spent = time.monotonic() - t
        if code is None:
            print(f"[bench] {script.stem}: stopped after {spent:.0f} s (budget)", file=sys.stderr)
        else:
            print(f"[bench] {script.stem}: exit {code} after {spent:.0f} s", file=sys.stderr)
        if code != 0:
            failed.append(script.stem)
    print(f"[bench] total {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(summary_line(found), flush=True)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
