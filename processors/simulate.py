"""A realistic synthetic clickstream (``nudgeflow simulate``) for tests, benchmarks and load tests.

Each user lives through sessions (seconds to minutes between events, hours to days between
sessions, mostly in daytime UTC). A session opens with some browsing and then, usually, one
journey of a live action in ``examples/campaigns.yaml``, with both outcomes:

* browsing: page views and the odd one-off product view;
* product interest: the same ``product_id`` viewed 3+ times within an hour (or only twice);
* carts: ``add_to_cart`` (product_id, product_name, cart_value) then checkout and ``purchase``
  within minutes, or abandoned (no purchase);
* forms and bookings: ``form_start`` -> ``form_submit`` and ``booking_start`` ->
  ``booking_complete``, or dropped;
* event signups: ``event_signup`` with ``event_name`` and ``event_start`` 1-10 days ahead; some are
  followed by an ``event_cancel`` (same session or the next);
* loyalty: ``points_earned`` with ``tier`` (gold/silver) and ``points``, also after purchases.

Streams are merged with a heap holding one entry per user (the user's next event, or the start
of the user's next session), so memory is bounded by the number of users and by one session
each, not by the number of events. Events come out in arrival order = ts order; ties are broken
by user number, so a seed always gives the same stream and a shorter run is a prefix of a
longer one.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

from processors.core.events import (
    MAX_TS_MS,
    MIN_TS_MS,
    ClickEvent,
    iso_ms,
    make_event,
)

if TYPE_CHECKING:
    pass

START_MS = 1_709_251_200_000  # 2024-03-01T00:00:00Z
MAX_EVENTS_PER_USER = 100_000  # beyond this, one user's history would run past year 2100

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

PAGES = (
    "/",
    "/new",
    "/sale",
    "/search",
    "/category/shoes",
    "/category/bags",
    "/category/outdoor",
    "/category/clothing",
    "/stores",
    "/faq",
    "/about",
)
PRODUCTS: tuple[tuple[str, str, int], ...] = (  # id, name, price in cents
    ("p01", "trail shoes", 8900),
    ("p02", "rain jacket", 12000),
    ("p03", "leather bag", 15900),
    ("p04", "wool socks", 1400),
    ("p05", "headlamp", 3500),
    ("p06", "running cap", 2200),
    ("p07", "hiking poles", 6400),
    ("p08", "down vest", 9900),
    ("p09", "water bottle", 1900),
    ("p10", "city sneakers", 7400),
    ("p11", "backpack 30l", 11000),
    ("p12", "fleece jumper", 5900),
    ("p13", "sunglasses", 4800),
    ("p14", "gym shorts", 2900),
    ("p15", "yoga mat", 3900),
    ("p16", "tent 2p", 24900),
    ("p17", "sleeping bag", 13900),
    ("p18", "gloves", 2500),
    ("p19", "beanie", 1800),
    ("p20", "travel mug", 1600),
)
FORMS = ("store card application", "newsletter preferences", "return request", "warranty claim")
SERVICES = ("bike fitting", "shoe repair", "personal styling", "ski servicing")
EVENT_NAMES = (
    "spring trail run",
    "yoga in the park",
    "product launch night",
    "repair workshop",
    "running club meetup",
)
LOYALTY_REASONS = ("review", "check_in", "referral", "birthday")
GOLD_SHARE = 0.3

# Journey mix per session (cumulative thresholds on one uniform draw).
_JOURNEYS = (
    (0.20, "browse"),
    (0.36, "interest"),
    (0.60, "cart"),
    (0.71, "form"),
    (0.82, "booking"),
    (0.91, "signup"),
    (1.00, "loyalty"),
)

# Heap entry: (ts, user index, event_type, properties, session_id). One entry per user, so
# (ts, user index) is unique and the rest is never compared. event_type None = session start.
_Entry = tuple[int, int, str | None, dict[str, str] | None, str | None]


@lru_cache(maxsize=4096)
def _iso(ms: int) -> str:
    """ISO text of event start times (whole hours, so few distinct values: cache them)."""
    return iso_ms(ms)


_make_event = make_event  # the fast constructor (processors.core.events)


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


class _Simulator:
    """Per-user journey state and the session builder; ``run`` merges the users' streams."""

    def __init__(self, users: int, seed: int, start_ms: int) -> None:
        self.rng = random.Random(seed)
        self.r = self.rng.random
        self.uids = [f"u{i + 1:06d}" for i in range(users)]
        self.tiers = ["gold" if self.r() < GOLD_SHARE else "silver" for _ in range(users)]
        self.sessions = [0] * users
        self.carts = [0] * users  # orders per user (order ids)
        self.bookings = [0] * users
        # A signup the user will cancel at the start of the next session: (event_name, start).
        self.pending_cancel: dict[int, tuple[str, int]] = {}
        self.start_ms = start_ms

    # -- time -------------------------------------------------------------------------------

    def _daytime(self, t: int) -> int:
        """Move a session start that falls in 00:00-06:59 UTC to the morning."""
        hour = (t // HOUR) % 24
        if hour < 7:
            t += (7 - hour) * HOUR + int(self.r() * 3 * HOUR)
        return t

    def first_start(self) -> int:
        return self._daytime(self.start_ms + int(self.r() * DAY))

    def next_start(self, last_ts: int) -> int:
        """Hours to days after the session's last event (median ~14 h, long tail to ~6 days)."""
        gap = HOUR + int(self.rng.expovariate(1 / (20 * HOUR)))
        return self._daytime(last_ts + min(gap, 6 * DAY))

    def _dwell(self) -> int:
        """Seconds to a few minutes, skewed short (time spent on one page)."""
        x = self.r()
        return 5 * SECOND + int(x * x * 4 * MINUTE)

    # -- sessions ---------------------------------------------------------------------------

    def session(self, i: int, t: int) -> list[_Entry]:
        """The events of user ``i``'s next session starting at ``t``, in time order."""
        r = self.r
        self.sessions[i] += 1
        uid = self.uids[i]
        sid = f"{uid}-s{self.sessions[i]}"
        out: list[_Entry] = []
        add = out.append

        cancel = self.pending_cancel.pop(i, None)
        if cancel is not None and t < cancel[1] - HOUR:
            add((t, i, "event_cancel", {"event_name": cancel[0]}, sid))
            t += self._dwell()
        for _ in range(1 + int(r() * 3)):
            add((t, i, "page_view", {"page": PAGES[int(r() * len(PAGES))]}, sid))
            t += self._dwell()

        x = r()
        kind = next(name for bound, name in _JOURNEYS if x < bound)
        t = getattr(self, "_" + kind)(i, t, sid, out)

        for _ in range(int(r() * 3)):
            t += self._dwell()
            add((t, i, "page_view", {"page": PAGES[int(r() * len(PAGES))]}, sid))
        return out

    def _product(self) -> tuple[str, str, int]:
        return PRODUCTS[int(self.r() * len(PRODUCTS))]

    def _browse(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        r = self.r
        for n in range(2 + int(r() * 7)):
            if n:
                t += self._dwell()
            if r() < 0.2:
                pid, name, _price = self._product()
                out.append((t, i, "product_view", {"product_id": pid, "product_name": name}, sid))
            else:
                out.append((t, i, "page_view", {"page": PAGES[int(r() * len(PAGES))]}, sid))
        return t

    def _interest(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        """The same product viewed again and again: 3-5 views within the hour, or just 2."""
        r = self.r
        pid, name, _price = self._product()
        views = 3 + (r() < 0.4) + (r() < 0.15) if r() < 0.7 else 2
        for n in range(views):
            if n:
                # Between views: up to ~8.5 min, so 5 views still fall within one hour.
                t += 20 * SECOND + int(r() * 5 * MINUTE)
                if r() < 0.5:
                    out.append((t, i, "page_view", {"page": PAGES[int(r() * len(PAGES))]}, sid))
                    t += 10 * SECOND + int(r() * 3 * MINUTE)
            out.append((t, i, "product_view", {"product_id": pid, "product_name": name}, sid))
        return t

    def _cart(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        """Add to cart, then buy within minutes (~55 %) or leave (abandoned cart)."""
        r = self.r
        total = 0
        for n in range(1 + (r() < 0.3)):
            if n:
                t += self._dwell()
            pid, name, price = self._product()
            props = {"product_id": pid, "product_name": name}
            out.append((t, i, "product_view", props, sid))
            t += 20 * SECOND + int(r() * 3 * MINUTE)
            total += price
            cart = {**props, "cart_value": _money(total)}
            out.append((t, i, "add_to_cart", cart, sid))
        if r() < 0.55:
            t += MINUTE + int(r() * 4 * MINUTE)
            out.append((t, i, "checkout_start", {"cart_value": _money(total)}, sid))
            t += MINUTE + int(r() * 5 * MINUTE)
            self.carts[i] += 1
            order = {"order_id": f"o-{self.uids[i]}-{self.carts[i]}", "value": _money(total)}
            out.append((t, i, "purchase", order, sid))
            t += 2 * SECOND + int(r() * 10 * SECOND)
            points = {"tier": self.tiers[i], "points": str(total // 100), "reason": "purchase"}
            out.append((t, i, "points_earned", points, sid))
        return t

    def _form(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        r = self.r
        form = {"form_name": FORMS[int(r() * len(FORMS))]}
        out.append((t, i, "form_start", form, sid))
        if r() < 0.6:
            t += 2 * MINUTE + int(r() * 10 * MINUTE)
            out.append((t, i, "form_submit", dict(form), sid))
        return t

    def _booking(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        r = self.r
        out.append((t, i, "page_view", {"page": "/book"}, sid))
        t += 10 * SECOND + int(r() * MINUTE)
        service = SERVICES[int(r() * len(SERVICES))]
        out.append((t, i, "booking_start", {"service": service}, sid))
        if r() < 0.6:
            t += MINUTE + int(r() * 7 * MINUTE)
            self.bookings[i] += 1
            done = {"service": service, "booking_id": f"b-{self.uids[i]}-{self.bookings[i]}"}
            out.append((t, i, "booking_complete", done, sid))
        return t

    def _signup(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        """Sign up for an event 1-10 days ahead (on the hour); ~20 % cancel later."""
        r = self.r
        out.append((t, i, "page_view", {"page": "/events"}, sid))
        t += 10 * SECOND + int(r() * 2 * MINUTE)
        name = EVENT_NAMES[int(r() * len(EVENT_NAMES))]
        day = (t // DAY + 1 + int(r() * 10)) * DAY
        starts = day + (9 + int(r() * 11)) * HOUR
        if starts - t < DAY:
            starts += DAY  # keep it at least a day ahead
        out.append((t, i, "event_signup", {"event_name": name, "event_start": _iso(starts)}, sid))
        x = r()
        if x < 0.1:
            t += MINUTE + int(r() * 4 * MINUTE)
            out.append((t, i, "event_cancel", {"event_name": name}, sid))
        elif x < 0.2:
            self.pending_cancel[i] = (name, starts)
        return t

    def _loyalty(self, i: int, t: int, sid: str, out: list[_Entry]) -> int:
        r = self.r
        for n in range(1 + (r() < 0.3)):
            if n:
                t += MINUTE + int(r() * 9 * MINUTE)
            points = {
                "tier": self.tiers[i],
                "points": str(10 * (1 + int(r() * 30))),
                "reason": LOYALTY_REASONS[int(r() * len(LOYALTY_REASONS))],
            }
            out.append((t, i, "points_earned", points, sid))
        return t

    # -- merge ------------------------------------------------------------------------------

    def run(self, events: int, id_prefix: str) -> Iterator[ClickEvent]:
        heap: list[_Entry] = [
            (self.first_start(), i, None, None, None) for i in range(len(self.uids))
        ]
        heapq.heapify(heap)
        # The rest of each user's live session, reversed (pop() is the next event); memory is
        # held only for users who are in a session.
        pending: list[list[_Entry]] = [[] for _ in self.uids]
        uids = self.uids
        replace = heapq.heapreplace
        make = _make_event
        n = 0
        while n < events:
            ts, i, etype, props, sid = heap[0]
            if etype is None:
                rest = self.session(i, ts)
                rest.reverse()
                replace(heap, rest.pop())
                pending[i] = rest
                continue
            n += 1
            yield make(id_prefix + str(n), uids[i], etype, ts, sid, props)  # type: ignore[arg-type]
            rest = pending[i]
            if rest:
                replace(heap, rest.pop())
            else:
                replace(heap, (self.next_start(ts), i, None, None, None))


def generate(
    users: int, events: int, seed: int = 0, start_ms: int = START_MS
) -> Iterator[ClickEvent]:
    """``events`` synthetic events of ``users`` users in arrival (= ts) order.

    Deterministic for a seed; event ids are ``sim-<seed>-<n>`` (n = 1, 2, … in arrival order),
    user ids ``u000001``…, session ids ``<user>-s<k>``. Raises ``ValueError`` on bad arguments.
    """
    if isinstance(users, bool) or not isinstance(users, int) or users < 1:
        raise ValueError(f"users must be a positive integer, got {users!r}")
    if isinstance(events, bool) or not isinstance(events, int) or events < 0:
        raise ValueError(f"events must be a non-negative integer, got {events!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if events > users * MAX_EVENTS_PER_USER:
        raise ValueError(
            f"{events} events for {users} users is more than {MAX_EVENTS_PER_USER} per user: "
            "add users (one user's history would run for decades)"
        )
    if not MIN_TS_MS <= start_ms <= MAX_TS_MS - 40 * 365 * DAY:
        raise ValueError(f"start {start_ms} must be epoch milliseconds between 2000 and 2060")
    return _Simulator(users, seed, start_ms).run(events, f"sim-{seed}-")
