"""The realistic day of ``nudgeflow demo``: a store's clickstream and its customers' phones.

:func:`write_day` generates one day of a store's clickstream with :mod:`processors.simulate`
(fixed seed: every run is the same day) and the shoppers' contact profiles: several time zones
(some known only from the phone number) and a consent mix (opted in, opted out, unknown, no
contact on file). Pure except :func:`write_day`, which writes the files.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processors.simulate import DAY, generate

DAY_USERS = 2_000
DAY_SEED = 7
DAY_START_MS = 1_710_374_400_000  # 2024-03-14T00:00:00Z, a Thursday

# (zone, how to make the n-th phone number of that zone, share of contacts)
ZONES: tuple[tuple[str, Callable[[int], str], int], ...] = (
    ("America/New_York", lambda n: f"+1212555{n:04d}", 30),
    ("America/Los_Angeles", lambda n: f"+1415555{n:04d}", 20),
    ("Europe/London", lambda n: f"+447911{n:06d}", 24),
    ("Europe/Berlin", lambda n: f"+4930901{n:05d}", 8),
    ("Asia/Kolkata", lambda n: f"+9198765{n:05d}", 11),
    ("Australia/Sydney", lambda n: f"+614{12345000 + n:08d}", 7),
)
FIRST_NAMES = (
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Gia",
    "Hugo",
    "Ivy",
    "Jon",
    "Kai",
    "Lena",
    "Mo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
)
# Consent mix of the customer base: shares of the users (the rest are opted in).
NO_CONTACT = 0.05
OPTED_OUT = 0.08
UNKNOWN_CONSENT = 0.04
ZONE_FROM_PHONE = 0.15  # profiles without a time zone: the dispatcher derives it from the number


@dataclass(frozen=True)
class DayFiles:
    events: Path
    contacts: Path
    n_events: int
    n_contacts: int
    users: int


def day_events(users: int = DAY_USERS, seed: int = DAY_SEED, start_ms: int = DAY_START_MS) -> Any:
    """The simulated clickstream from ``start_ms`` to one day later (ts order)."""
    end = start_ms + DAY
    for event in generate(users, users * 1_000, seed, start_ms):
        if event.ts >= end:
            return
        yield event


def day_contacts(users: int = DAY_USERS, seed: int = DAY_SEED) -> list[dict[str, str]]:
    """Profiles of the simulated users ``u000001``…: zones, phone numbers, consent mix."""
    rng = random.Random(f"contacts:{seed}")
    weights = [w for _z, _p, w in ZONES]
    counters: Counter[str] = Counter()
    out = []
    for i in range(users):
        uid = f"u{i + 1:06d}"
        x = rng.random()
        zone, phone_of, _w = rng.choices(ZONES, weights)[0]
        counters[zone] += 1
        if x < NO_CONTACT:
            continue
        consent = (
            "opted_out"
            if x < NO_CONTACT + OPTED_OUT
            else "unknown"
            if x < NO_CONTACT + OPTED_OUT + UNKNOWN_CONSENT
            else "opted_in"
        )
        row = {
            "user_id": uid,
            "phone": phone_of(counters[zone]),
            "consent": consent,
            "first_name": FIRST_NAMES[int(rng.random() * len(FIRST_NAMES))],
        }
        if rng.random() >= ZONE_FROM_PHONE:
            row["timezone"] = zone
        out.append(row)
    return out


def write_day(
    directory: Path,
    users: int = DAY_USERS,
    seed: int = DAY_SEED,
    start_ms: int = DAY_START_MS,
    progress: bool = True,
) -> DayFiles:
    """``DIR/day-events.jsonl`` and ``DIR/day-contacts.jsonl`` (canonical JSON Lines)."""
    from tqdm import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    events = directory / "day-events.jsonl"
    contacts = directory / "day-contacts.jsonl"
    n = 0
    with (
        events.open("w", encoding="utf-8") as fh,
        tqdm(desc="1/5 generate a day", unit="ev", disable=not progress, leave=True) as bar,
    ):
        for event in day_events(users, seed, start_ms):
            fh.write(json.dumps(event.to_json()) + "\n")
            n += 1
            if not n % 1000:
                bar.update(1000)
        bar.update(n % 1000)
    rows = day_contacts(users, seed)
    contacts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return DayFiles(events, contacts, n, len(rows), users)


def local_zone(contact: Mapping[str, Any], default_tz: str = "UTC") -> str:
    """The zone quiet hours use for a contact: its profile's, else from the phone number."""
    from processors.core.contact import Contact, resolve_timezone

    zone = resolve_timezone(
        Contact(user_id="-", phone=str(contact["phone"]), timezone=contact.get("timezone")),
        default_tz,
    )
    return str(zone.key)
