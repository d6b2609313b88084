"""A simulated stream through the engine, every state round-tripped through its bytes on the
way (as the worker's table does): what two builds of the engine must agree on. Run as a script
(``python -m tests.support.replay CAMPAIGNS``) it prints the result as JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

from processors.core.campaign import load_campaigns
from processors.core.engine import FLUSH_MS, Engine, UserState
from processors.simulate import generate


def replay(campaigns_path: str) -> dict[str, Any]:
    """Decisions and cancellations in order, and every user's final state bytes (hex)."""
    engine = Engine(load_campaigns(campaigns_path), allowed_lateness_ms=30_000)
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
    return {"out": out, "states": {u: s.hex() for u, s in states.items()}}


if __name__ == "__main__":
    print(json.dumps(replay(sys.argv[1])))
