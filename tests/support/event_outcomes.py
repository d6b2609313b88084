"""What each reader of a clickstream record makes of a fixed, seeded mix of accepted and refused
records, as JSON: run in the interpreted and in the compiled build, the two must be equal.

Each record goes through ``parse_event`` (files), ``parse_any_event`` (the reference reading) and
``ClickEvent.from_record`` (the worker's intake); an outcome is the event's fields and ``repr``,
the ``EventError`` reason, or the name of any other exception. ``pickled`` holds pickles of
accepted events, which the other build must read back as the same events.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable
from typing import Any

from processors.core.events import ClickEvent, EventError, parse_any_event, parse_event

IDS: list[Any] = ["e1", "u1", "add_to_cart", "", " ", "\t", "\x00u", "x" * 256, "x" * 257,
                  "é", 7, 0, -1.5, True, None, ["a"], {"a": 1}]  # fmt: skip
TS: list[Any] = [
    "2024-03-13T10:23:32Z", "2024-03-13T10:23:32.617Z", "2024-03-13T10:23:32.6175Z",
    " 2024-03-13T10:23:32Z", "2024-03-13T10:23:32z", "2024-03-13T10:23:32+02:00",
    "2024-03-13T10:23:32", "2024-03-13T25:00:00Z", "1999-12-31T23:59:59Z", "yesterdayZ", "",
    "1710325412000", " 1710325412000 ", "1710325412000.5", 1_710_325_412_000, 1_710_325_412,
    946_684_800_000, 4_102_444_800_000, 1.710325412e12, float("nan"), True, None, [1],
]  # fmt: skip
VALUES: list[Any] = ["v", "", "v" * 2048, "v" * 2049, 3, 2.5, False, None, ["v"], {"v": 1}]
KEYS: list[Any] = ["k", "", "k" * 128, "k" * 129, 5]


def _properties(rng: random.Random) -> Any:
    shape = rng.randrange(8)
    if shape == 0:
        return None
    if shape == 1:
        return rng.choice([["a"], "ab", 5, []])
    if shape == 2:
        return {f"k{i}": "v" for i in range(rng.choice([64, 65]))}
    size = rng.randrange(4)
    if shape < 6:  # mostly strings, the common case
        return {rng.choice(["a", "b", "c"]): rng.choice(["x", "yy", ""]) for _ in range(size)}
    return {rng.choice(KEYS): rng.choice(VALUES) for _ in range(size)}


def records(n: int = 3_000, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` records: about half canonical, the others with any field of any form or absent."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        rec: dict[str, Any] = {
            "event_id": f"e{rng.randrange(99)}",
            "user_id": "u1",
            "event_type": "add_to_cart",
            "ts": "2024-03-13T10:23:32Z",
            "session_id": rng.choice(["s1", None]),
            "properties": {"p": "9"},
        }
        if rng.random() < 0.5:
            for name in ("event_id", "user_id", "event_type", "session_id"):
                if rng.random() < 0.3:
                    rec[name] = rng.choice(IDS)
            if rng.random() < 0.5:
                rec["ts"] = rng.choice(TS)
            if rng.random() < 0.5:
                rec["properties"] = _properties(rng)
            for name in list(rec):
                if rng.random() < 0.05:
                    del rec[name]
        out.append(rec)
    return out


def _outcome(read: Callable[[Any], ClickEvent], record: dict[str, Any]) -> list[Any]:
    try:
        event = read(record)
    except EventError as exc:
        return ["refused", exc.reason]
    except (KeyError, TypeError, ValueError) as exc:
        return ["error", type(exc).__name__]
    return ["event", event.to_record(), repr(event)]


def _from_avro(record: dict[str, Any]) -> ClickEvent:
    """``from_record`` on the record as Avro gives it: ``ts`` in epoch milliseconds."""
    if record.get("ts") == "2024-03-13T10:23:32Z":
        record = {**record, "ts": 1_710_325_412_000}
    return ClickEvent.from_record(record)


def event_outcomes() -> dict[str, Any]:
    readers = {
        "parse_event": parse_event,
        "parse_any_event": parse_any_event,
        "from_record": _from_avro,
    }
    recs = records()
    accepted = [parse_any_event(r) for r in recs if _outcome(parse_any_event, r)[0] == "event"]
    return {
        **{name: [_outcome(read, r) for r in recs] for name, read in readers.items()},
        "pickled": [pickle.dumps(e).hex() for e in accepted[:50]],
    }
