"""The gateway rate limit shared by every dispatcher instance: paced slots plus an exact window cap.

Vonage accepts 30 requests/s per account by default; more gets status 1 (throttled). Two steps,
both atomic in Redis and timed by Redis' own clock (hosts with skewed clocks agree):

1. **Pacing (GCRA).** Each caller books the next free slot (``slot = max(now, tat)``,
   ``tat = slot + window / limit``) and sleeps until it, so requests go out evenly spaced
   instead of in bursts.
2. **Guard (sliding window).** Each admitted request is kept in a sorted set, scored with a time
   the gateway cannot have received it after: ``admitted + lease_s`` while it is in flight, and
   "now" once the caller reports the answer (:meth:`RateLimiter.done`, or the same thread's next
   :meth:`RateLimiter.acquire`: callers make the request synchronously in the thread that
   acquired it). A request is admitted only while fewer than ``limit`` members score later than
   ``now - window``, i.e. fewer than ``limit`` requests are still in flight or were answered
   within the last window. A waiting caller sleeps until the lowest answered score leaves the
   window, or polls (``poll_s``) when every counted request is still in flight.

Why this is exact ("the gateway never receives more than ``limit`` requests in any window"):
suppose it received ``limit + 1`` within one window, and let R be the one admitted last (Redis
serialises admissions), at time ``a``. R reached the gateway at ``r >= a``; every other one, Q,
at ``r_Q > r - window >= a - window``. When R was admitted, Q's score was either
``admitted_Q + lease_s`` (no answer yet; ``>= r_Q`` by the one assumption below) or the time its
answer was reported (``>= r_Q``: the gateway answers after it receives). Either way Q scored
later than ``a - window`` and was counted, so R saw ``limit`` members and was not admitted: a
contradiction. Nothing here depends on how long a request takes between its slot and the
gateway: a request whose write was delayed (CPU contention, a new TLS connection, a slow
server thread) stays counted until its answer is in.

The one assumption: a request without a reported answer reaches the gateway within ``lease_s``
of its admission (default 30 s: longer than one gateway attempt, which requests bounds by the
connect plus the read timeout, 2 x 10 s by default). A caller that gives up on a request
(timeout) reports it like an answer; the gateway reading that request even later is beyond what
a client can see.

What it costs: each request holds its place from admission to ``answer + window``, so the
achieved rate is ``limit * window / (window + round trip)`` (the window with the margin below),
~96% of the rate with a 20 ms gateway. A request whose thread goes idle without
:meth:`RateLimiter.done` holds its place for ``lease_s``: callers should call ``done()`` right
after the answer (with thread pools much larger than ``limit`` this matters). A crashed
process's requests hold their places for ``lease_s``.

Margin: the enforced window is ``MARGIN`` (1%) longer than ``limit / rate``, and the slots are
spaced to match, so the budget holds with up to 10 ms to spare at 30/s when the gateway's clock or
arrival stamps disagree with Redis' (docs/adr/0027-gateway-rate-margin.md).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from processors.redis import scripts
from processors.redis.client import Client, is_cluster

DEFAULT_LEASE_S = 30.0
MIN_POLL_S = 0.01
MARGIN = 0.01


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` requests in any ``window_s``; slots ``window_s / limit`` apart;
    a request without a reported answer counts as in flight for ``lease_s``."""

    limit: int
    window_s: float
    lease_s: float

    @classmethod
    def for_rate(
        cls, rate_per_s: float, lease_s: float = DEFAULT_LEASE_S, margin: float = MARGIN
    ) -> Budget:
        """30/s -> 30 per 1 s; 0.5/s -> 1 per 2 s; 30.5/s -> 30 per 0.984 s; each window then
        ``margin`` longer (30/s, 1% -> 30 per 1.01 s)."""
        if not rate_per_s > 0 or not math.isfinite(rate_per_s):
            raise ValueError(f"rate must be > 0 requests/s, got {rate_per_s}")
        if not lease_s > 0:
            raise ValueError(f"lease must be > 0 s, got {lease_s}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        limit = max(1, math.floor(rate_per_s))
        return cls(limit, limit / rate_per_s * (1 + margin), lease_s)

    @property
    def spacing_s(self) -> float:
        return self.window_s / self.limit

    @property
    def poll_s(self) -> float:
        """How often a caller blocked by requests still in flight checks again."""
        return max(MIN_POLL_S, self.spacing_s)


def _has_tag(key: str) -> bool:
    """Whether ``key`` names its cluster slot by a hash tag (a non-empty ``{...}``)."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return end > start + 1


class RateLimiter:
    """``acquire()`` blocks until one more request is allowed; thread- and process-safe.

    Every instance that shares ``key`` (and the Redis) shares the budget: keys ``key`` (the
    pacing) and ``key:sent`` (the guard); on a Redis Cluster ``{key}`` and ``{key}:sent``, one
    slot, so each script stays on one node (``key`` holding a hash tag already is kept as it
    is). Contract: make the
    request right after ``acquire()`` returns, synchronously, in the same thread, and call
    ``done()`` once its answer is in (or the attempt failed); the thread's next ``acquire()``
    says so too, but a thread that goes idle without ``done()`` holds a place for ``lease_s``.
    """

    def __init__(
        self,
        client: Client,
        rate_per_s: float,
        key: str = "nudgeflow:ratelimit:gateway",
        *,
        lease_s: float = DEFAULT_LEASE_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.budget = Budget.for_rate(rate_per_s, lease_s)
        self.rate_per_s = rate_per_s
        if is_cluster(client) and not _has_tag(key):
            key = f"{{{key}}}"
        self.key = key
        self.sent_key = f"{key}:sent"
        self.interval_us = max(1, round(1_000_000 * self.budget.spacing_s))
        self._window_us = max(1, round(1_000_000 * self.budget.window_s))
        self._lease_us = max(1, round(1_000_000 * self.budget.lease_s))
        self._poll_us = max(1, round(1_000_000 * self.budget.poll_s))
        self._book = scripts.register(client, "rate_book")
        self._guard = scripts.register(client, "rate_guard")
        self._done = scripts.register(client, "rate_done")
        self._sleep = sleep
        self._ids = itertools.count()
        self._me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._local = threading.local()
        self.waited_s = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for a paced slot, then for room in the window; returns the seconds waited."""
        return self.pace() + self.admit()

    def pace(self) -> float:
        """Mark this thread's previous request answered, book the next slot and sleep until it;
        returns the seconds waited."""
        previous = getattr(self._local, "member", None) or ""
        self._local.member = None
        (wait_us,) = self._book(keys=[self.key, self.sent_key], args=[self.interval_us, previous])
        return self._wait(int(wait_us) / 1_000_000)

    def admit(self) -> float:
        """Record this request once the window has room (usually at once after :meth:`pace`);
        returns the seconds waited. The request should go out right after this returns."""
        member = f"{self._me}-{next(self._ids)}"
        args: list[str | int] = [
            self.budget.limit,
            self._window_us,
            self._lease_us,
            self._poll_us,
            member,
        ]
        waited = 0.0
        while True:
            (wait_us,) = self._guard(keys=[self.sent_key], args=args)
            if int(wait_us) == 0:
                self._local.member = member
                return waited
            waited += self._wait(int(wait_us) / 1_000_000)

    def done(self) -> None:
        """This thread's last request was answered (or failed): from now on it counts only
        until it leaves the window."""
        member = getattr(self._local, "member", None)
        if member:
            self._local.member = None
            self._done(keys=[self.sent_key], args=[member])

    def _wait(self, seconds: float) -> float:
        if seconds <= 0:
            return 0.0
        self._sleep(seconds)
        with self._lock:
            self.waited_s += seconds
        return seconds
