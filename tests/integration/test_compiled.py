"""The compiled build (``make compiled``: mypyc over the same source, in ``build/compiled``) runs
the engine's oracle and property checks and decides exactly what the interpreted source decides.

Skipped when the build is absent (``make test`` builds it first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processors.core.campaign import load_campaigns
from processors.core.engine import FLUSH_MS, Engine, UserState
from processors.simulate import generate

ROOT = Path(__file__).resolve().parents[2]
COMPILED = Path(os.environ.get("NUDGEFLOW_COMPILED_DIR", ROOT / "build" / "compiled"))
COMPILED_MODULES = [
    "processors.core.engine.engine",
    "processors.core.engine.rules",
    "processors.core.engine.state",
    "processors.core.engine.state_format",
    "processors.core.trigger",
    "processors.core.segment",
    "streams.intake",
]

pytestmark = pytest.mark.skipif(
    not (COMPILED / ".compiled").exists(), reason="no compiled build (make compiled)"
)

# Run in the compiled build: the decisions of a simulated stream, every state round-tripped
# through its bytes on the way (as the worker's table does).
_REPLAY = """
import json, sys
from processors.core.campaign import load_campaigns
from processors.core.engine import FLUSH_MS, Engine, UserState
from processors.simulate import generate
engine = Engine(load_campaigns(sys.argv[1]), allowed_lateness_ms=30_000)
states, out = {}, []
for e in generate(300, 6_000, 11):
    raw = states.get(e.user_id)
    step = engine.on_event(None if raw is None else UserState.from_bytes(raw), e)
    out += [[d.decision_id, d.fire_at, d.variant, d.stage] for d in step.decisions]
    out += [[c.decision_id, c.reason] for c in step.cancellations]
    if step.state is not None:
        states[e.user_id] = step.state.to_bytes()
for user in sorted(states):
    step = engine.on_time(UserState.from_bytes(states[user]), FLUSH_MS)
    out += [[d.decision_id, d.fire_at, d.variant, d.stage] for d in step.decisions]
    states[user] = b"" if step.state is None else step.state.to_bytes()
print(json.dumps({"out": out, "states": {u: s.hex() for u, s in states.items()}}))
"""


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


def test_the_oracle_and_property_checks_pass_on_the_compiled_build() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append",
         "tests/unit/core/test_engine_property.py", "tests/unit/core/test_engine.py",
         "tests/unit/core/test_engine_reuse.py",
         "tests/unit/streams/test_state_format.py", "tests/integration/test_exits.py"],
        env=_compiled_env(), cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_compiled_and_interpreted_builds_agree() -> None:
    campaigns = str(ROOT / "examples" / "campaigns.yaml")
    compiled = json.loads(
        subprocess.run(
            [sys.executable, "-c", _REPLAY, campaigns],
            env=_compiled_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    engine = Engine(load_campaigns(campaigns), allowed_lateness_ms=30_000)
    states: dict[str, bytes] = {}
    out: list[list[object]] = []
    for e in generate(300, 6_000, 11):
        raw = states.get(e.user_id)
        step = engine.on_event(None if raw is None else UserState.from_bytes(raw), e)
        out += [[d.decision_id, d.fire_at, d.variant, d.stage] for d in step.decisions]
        out += [[c.decision_id, c.reason] for c in step.cancellations]
        if step.state is not None:
            states[e.user_id] = step.state.to_bytes()
    for user in sorted(states):
        step = engine.on_time(UserState.from_bytes(states[user]), FLUSH_MS)
        out += [[d.decision_id, d.fire_at, d.variant, d.stage] for d in step.decisions]
        states[user] = b"" if step.state is None else step.state.to_bytes()
    assert len(out) > 100
    assert compiled["out"] == out
    # the same bytes: either build reads the other's states
    assert compiled["states"] == {u: s.hex() for u, s in states.items()}
