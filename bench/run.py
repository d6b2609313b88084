"""``make bench``: run every benchmark in ``bench/`` with its defaults and print its figures.

Each benchmark is a script that prints ``key=value`` lines on stdout (progress on stderr) and
tears down whatever it started. They run one after another, in name order, as subprocesses, so
that one benchmark's broker, worker or memory cannot skew the next. The whole run has a time
budget (10 minutes, as issue 7 asks of ``make bench``); a benchmark still running when the budget
is spent gets SIGTERM (it then stops what it started) and the run fails.
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
TERM_GRACE_S = 60.0  # a benchmark's teardown (worker + broker stop) takes well under this


def discover(names: list[str]) -> list[Path]:
    """Benchmark scripts in ``bench/`` (all but this file and ``_private`` ones), by name."""
    found = sorted(
        p for p in BENCH_DIR.glob("*.py") if p.name != Path(__file__).name and p.name[0] != "_"
    )
    if not names:
        return found
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
        spent = time.monotonic() - t
        if code is None:
            print(f"[bench] {script.stem}: stopped after {spent:.0f} s (budget)", file=sys.stderr)
        else:
            print(f"[bench] {script.stem}: exit {code} after {spent:.0f} s", file=sys.stderr)
        if code != 0:
            failed.append(script.stem)
    print(f"[bench] total {time.monotonic() - started:.0f} s", file=sys.stderr)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
