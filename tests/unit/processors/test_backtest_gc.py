"""The backtest runs without garbage collection: it must make no reference cycles, or a long
file would grow the heap with garbage nothing frees."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

from processors.commands.backtest import BacktestResult, backtest_file
from processors.settings import REPO_ROOT
from processors.simulate import generate

CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"


def _lines() -> list[str]:
    """Simulated events, shuffled within a minute, some twice, one far too late, bad lines."""
    events = [e.to_json() for e in generate(200, 3_000, 5)]
    lines = [json.dumps(e) for e in events]
    rng = random.Random(5)
    for i in range(0, len(lines) - 3, 7):
        j = i + rng.randrange(1, 3)
        lines[i], lines[j] = lines[j], lines[i]
    lines += [lines[10], lines[500], json.dumps({**events[0], "event_id": "late"})]
    lines += ["not json", "[1]", '{"user_id": "u", "event_type": "x", "ts": "soon"}']
    lines.append(json.dumps({k: v for k, v in events[7].items() if k != "event_id"}))
    return lines


def _cyclic_garbage(path: Path) -> tuple[BacktestResult, int]:
    """A backtest of ``path`` with the collector off, and the cyclic garbage it left."""
    gc.collect()
    gc.disable()
    try:
        result = backtest_file(path, CAMPAIGNS)
        garbage = gc.collect()
    finally:
        gc.enable()
    return result, garbage


def test_a_backtest_makes_no_cyclic_garbage_per_line(tmp_path: Path) -> None:
    lines = _lines()
    small, large = tmp_path / "small.jsonl", tmp_path / "events.jsonl"
    small.write_text(lines[0] + "\n")
    large.write_text("\n".join(lines) + "\n")
    csv = tmp_path / "events.csv"
    csv.write_text("event_id,user_id,event_type,ts,session_id,page\ne1,u1,page_view,x,s,/\n")
    _, baseline = _cyclic_garbage(small)  # loading the campaigns (templates) makes some
    result, garbage = _cyclic_garbage(large)
    assert result.decisions and result.cancellations and result.bad_lines == 3
    assert result.rejected["duplicate"] == 2 and result.rejected["late"] >= 1
    assert garbage == baseline
    assert _cyclic_garbage(csv)[1] == baseline
    assert gc.isenabled()
