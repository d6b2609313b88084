"""The compiled build (``make compiled``: mypyc over the same source, in ``build/compiled``) runs
the engine's oracle and property checks and decides exactly what the interpreted source decides;
its worker batch path produces exactly the records and the state the interpreted one does.

Skipped when the build is absent (``make test`` builds it first).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from tests.support.event_outcomes import event_outcomes
from tests.support.replay import replay

ROOT = Path(__file__).resolve().parents[2]
COMPILED = Path(os.environ.get("NUDGEFLOW_COMPILED_DIR", ROOT / "build" / "compiled"))
COMPILED_MODULES = [
    "processors.core.engine.engine",
    "processors.core.engine.rules",
    "processors.core.engine.state",
    "processors.core.engine.state_format",
    "processors.core.trigger",
    "processors.core.segment",
    "processors.core.events",
    "streams.intake",
    "streams.pipeline",
    "streams.steps",
    "streams.episodes",
    "streams.state.users",
    "streams.state.cache",
    "streams.state.checkpoint",
]

pytestmark = pytest.mark.skipif(
    not (COMPILED / ".compiled").exists(), reason="no compiled build (make compiled)"
)


def _compiled_env() -> dict[str, str]:
    # PYTHONSAFEPATH: neither the working directory nor a script's directory goes before the
    # compiled build on sys.path.
    return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(COMPILED)}


def test_the_compiled_modules_are_the_ones_imported() -> None:
    probe = (
        "import importlib, json, sys\n"
        "print(json.dumps([importlib.import_module(m).__file__ for m in sys.argv[1:]]))"
    )
    files = subprocess.run(
        [sys.executable, "-c", probe, *COMPILED_MODULES],
        env=_compiled_env(), cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    paths = [Path(p) for p in json.loads(files)]
    assert all(p.suffix == ".so" and COMPILED in p.parents for p in paths), paths


@pytest.mark.long  # ~30 s / ~10 s: make test-long (CI runs it after make test)
def test_the_oracle_and_property_checks_pass_on_the_compiled_build() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append",
         "tests/unit/core/test_engine_property.py", "tests/unit/core/test_engine.py",
         "tests/unit/core/test_engine_reuse.py", "tests/unit/core/test_event_validation.py",
         "tests/unit/core/test_event_parsing.py",
         "tests/unit/streams/test_state_format.py"],
        env=_compiled_env(), cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_compiled_and_interpreted_builds_agree() -> None:
    campaigns = str(ROOT / "examples" / "campaigns.yaml")
    # the script path goes after the compiled build on sys.path (PYTHONSAFEPATH; -m would
    # put the working directory first)
    script = (
        "import json, sys; sys.path.append(sys.argv[2]); "
        "from tests.support.replay import replay; print(json.dumps(replay(sys.argv[1])))"
    )
    compiled = json.loads(
        subprocess.run(
            [sys.executable, "-c", script, campaigns, str(ROOT)],
            env=_compiled_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    interpreted = replay(campaigns)
    assert len(interpreted["out"]) > 100
    assert compiled["out"] == interpreted["out"]
    # the same bytes: either build reads the other's states
    assert compiled["states"] == interpreted["states"]


@pytest.mark.long  # ~30 s / ~10 s: make test-long (CI runs it after make test)
def test_the_compiled_worker_path_produces_what_the_interpreted_one_does() -> None:
    script = (
        "import json, sys; sys.path.append(sys.argv[1]); "
        "from tests.support.worker_replay import worker_replay; "
        "print(json.dumps(worker_replay()))"
    )

    def replay(env: dict[str, str]) -> dict[str, Any]:
        run = subprocess.run(
            [sys.executable, "-c", script, str(ROOT)],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return cast(dict[str, Any], json.loads(run.stdout))

    compiled = replay(_compiled_env())
    interpreted = replay({**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(ROOT)})
    kinds = {topic for topic, *_ in interpreted["sent"]}
    assert len(kinds) == 3  # decisions, dead letters, changelog records
    assert sum(interpreted["open_episodes"].values()) > 0
    assert compiled["sent"] == interpreted["sent"]
    assert compiled["store"] == interpreted["store"]
    assert compiled["open_episodes"] == interpreted["open_episodes"]
    assert compiled["dead_letters"] == interpreted["dead_letters"]


def test_compiled_and_interpreted_events_agree() -> None:
    """Every reader of a record gives the same event (fields and ``repr``) or the same reason in
    both builds, and an event pickled by either build is the same event in the other."""
    script = (
        "import json, pickle, sys; sys.path.append(sys.argv[1]); "
        "from tests.support.event_outcomes import event_outcomes; "
        "theirs = [repr(pickle.loads(bytes.fromhex(h))) for h in json.load(sys.stdin)]; "
        "print(json.dumps({**event_outcomes(), 'unpickled': theirs}))"
    )
    interpreted = event_outcomes()
    compiled = json.loads(
        subprocess.run(
            [sys.executable, "-c", script, str(ROOT)],
            env=_compiled_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            input=json.dumps(interpreted["pickled"]),
        ).stdout  # fmt: skip
    )
    for reader in ("parse_event", "parse_any_event", "from_record"):
        kinds = {outcome[0] for outcome in interpreted[reader]}
        reasons = {outcome[1] for outcome in interpreted[reader] if outcome[0] == "refused"}
        assert {"event", "refused"} <= kinds, kinds
        assert {"missing_user_id", "bad_event_id", "ts_out_of_range"} <= reasons, reasons
        assert compiled[reader] == interpreted[reader], reader
    assert {"bad_session_id", "bad_properties"} <= {
        outcome[1] for outcome in interpreted["from_record"] if outcome[0] == "refused"
    }
    assert len(interpreted["pickled"]) == 50
    mine = [pickle.loads(bytes.fromhex(h)) for h in interpreted["pickled"]]
    assert compiled["unpickled"] == [repr(e) for e in mine]
    assert [pickle.loads(bytes.fromhex(h)) for h in compiled["pickled"]] == mine
