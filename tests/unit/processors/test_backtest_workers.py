"""``nudgeflow backtest --workers N``: users spread over processes, the same answers as one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processors.commands.backtest import backtest_file, owner
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


@pytest.mark.parametrize("workers", [2, 3])
def test_several_workers_give_what_one_gives(
    tmp_path: Path, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path, bad_at = _file(tmp_path)
    one = backtest_file(path, CAMPAIGNS, workers=1)
    one_err = capsys.readouterr().err
    many = backtest_file(path, CAMPAIGNS, workers=workers)
    many_err = capsys.readouterr().err
    assert len(one.decisions) > 50 and one.cancellations
    assert many.decisions == one.decisions
    assert many.cancellations == one.cancellations
    assert many.rejected == one.rejected
    assert many.events == one.events == 6_001
    assert {line for line, _ in many.bad} == {line for line, _ in one.bad} == bad_at
    assert many.bad == one.bad
    reported = [x for x in many_err.splitlines() if "skipped" in x]
    assert reported == [x for x in one_err.splitlines() if "skipped" in x]
    assert len(reported) == len(bad_at)  # each bad line once


def test_every_user_has_one_owner_and_rejected_ids_go_to_the_first() -> None:
    ids = [f"u{i}" for i in range(1_000)]
    owners = [owner(u, 4) for u in ids]
    assert set(owners) == {0, 1, 2, 3}
    assert owners == [owner(u, 4) for u in ids]  # stable
    assert owner(12345, 4) == owner("12345", 4)  # numbers are read as their text
    assert owner(None, 4) == owner("", 4) == owner(True, 4) == owner(["u"], 4) == 0
