"""``nudgeflow backtest --workers N``: users spread over processes, the same answers as one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from processors.commands.backtest import owner
from processors.settings import REPO_ROOT
from processors.simulate import generate

CAMPAIGNS = REPO_ROOT / "examples" / "campaigns.yaml"
BAD = [
    '{"user_id": "u1", "event_type": "page_view"}',  # no ts
    "not json",
    "[1, 2]",
    '{"user_id": "", "event_type": "page_view", "ts": 1710325413000}',
    '{"user_id": 12345, "event_type": "add_to_cart", "ts": "2024-03-13T10:23:32Z"}',  # good
]


def _file(tmp_path: Path) -> tuple[Path, set[int]]:
    lines = [json.dumps(e.to_json()) for e in generate(800, 6_000, 3)]
    bad_at: set[int] = set()
    for i, text in enumerate(BAD[:-1]):
        at = 500 * (i + 1)
        lines.insert(at, text)
        bad_at.add(at + 1)
    lines.append(BAD[-1])
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, bad_at


def _backtest(path: Path, out: Path, workers: int) -> tuple[str, list[tuple[str, str]], str]:
    """The CLI in its own process (it forks its workers: not from inside the test process)."""
    run = subprocess.run(
        [sys.executable, "-m", "processors.commands.cli", "backtest", "--campaigns",
         str(CAMPAIGNS), "--events", str(path), "--out", str(out), "--workers", str(workers)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    skipped = re.findall(r"events\.jsonl:(\d+): skipped: ([^\r\n]*)", run.stderr)
    return run.stdout, skipped, out.read_text()


def test_three_workers_give_what_one_gives(tmp_path: Path) -> None:
    path, bad_at = _file(tmp_path)
    one_out, one_skipped, one_decisions = _backtest(path, tmp_path / "one.jsonl", 1)
    many_out, many_skipped, many_decisions = _backtest(path, tmp_path / "many.jsonl", 3)
    assert len(one_decisions.splitlines()) > 50
    assert many_decisions == one_decisions
    assert many_out == one_out  # per-campaign table, events, bad lines, cancellations, rejected
    assert "events=6001 bad_lines=4 " in one_out
    assert many_skipped == one_skipped  # each bad line once, in line order
    assert [int(line) for line, _reason in one_skipped] == sorted(bad_at)


def test_every_user_has_one_owner_and_rejected_ids_go_to_the_first() -> None:
    ids = [f"u{i}" for i in range(1_000)]
    owners = [owner(u, 4) for u in ids]
    assert set(owners) == {0, 1, 2, 3}
    assert owners == [owner(u, 4) for u in ids]  # stable
    assert owner(12345, 4) == owner("12345", 4)  # numbers are read as their text
    assert owner(None, 4) == owner("", 4) == owner(True, 4) == owner(["u"], 4) == 0
