"""The gateway rate limit shared by every dispatcher instance: paced slots plus an exact window cap.

Vonage accepts 30 requests/s per account by default; more gets status 1 (throttled). Two steps,
both atomic in Redis and timed by Redis' own clock (hosts with skewed clocks agree):

1. **Pacing (GCRA).** Each caller books the next free slot (``slot = max(now, tat)``,
   ``tat = slot + window / limit``) and sleeps until it, so requests go out evenly spaced
   instead of in bursts.
2. **Guard (sliding window).** Each admitted request is kept in a sorted set scored with the
   latest time the gateway can have received it; a new request is admitted only while fewer than
   ``limit`` requests score within the last ``window`` (else it sleeps until the lowest score
   leaves it). A request is scored ``admitted + hold_s`` at first, and lowered to "now" when the
   same thread calls :meth:`RateLimiter.acquire` again (or :meth:`RateLimiter.done`): callers make
   the request synchronously in the thread that acquired it, so by then the gateway has answered
   and therefore received it.

Why: slots alone cannot promise "never more than ``limit`` in any ``window``" at full speed. The
gateway sees each request some time after the slot (thread wake-up, Redis round trips, HTTP);
request k+30 lands less than a second after request k whenever k was delayed more than k+30,
which happens all the time, so a previous version stretched every slot by 10% (and still only
tolerated 100 ms of jitter, leaving 9% of the limit unused). Counting "latest possible receipt"
times instead makes the cap exact: if the gateway ever saw ``limit + 1`` requests within one
``window``, the last one admitted would have seen the other ``limit`` still scored inside the
window. The price is each request's own latency (it holds its place for ``window`` plus the time
until its answer), ~2-3% of the limit with a 20 ms gateway, and ``hold_s`` for a request whose
thread does not come back (end of a backlog: nothing is lost then). The one assumption left: a
request whose thread is away longer than ``hold_s`` reached the gateway within ``hold_s``.
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

import redis

DEFAULT_HOLD_S = 0.25

# KEYS[1] GCRA key, KEYS[2] the guard's sorted set; ARGV: slot spacing in us, the calling
# thread's previous request ('' if none). Marks that request answered, books a slot, returns
# the us to wait for it.
_BOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], 'XX', 'LT', string.format('%d', now), ARGV[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, tat)
local nxt = slot + tonumber(ARGV[1])
-- keep the key until every booked slot has passed, plus a second
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1000)
return {string.format('%d', slot - now)}
"""

# KEYS[1] the guard's sorted set (score = latest possible receipt, Redis time in us); ARGV:
# limit, window in us, hold in us, a unique member. Returns 0 when admitted, else the us to wait.
_GUARD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local hold = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - window))
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], string.format('%d', now + hold), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + hold) / 1000) + 1000)
  return {'0'}
end
local lowest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
return {string.format('%d', math.max(1, lowest + window - now + 1))}
"""

_DONE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'XX', 'LT', string.format('%d', now), ARGV[1])
return 0
"""


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` requests in any ``window_s``; slots ``window_s / limit`` apart."""

    limit: int
    window_s: float
    hold_s: float

    @classmethod
    def for_rate(cls, rate_per_s: float, hold_s: float = DEFAULT_HOLD_S) -> Budget:
        """30/s -> 30 per 1 s; 0.5/s -> 1 per 2 s; 30.5/s -> 30 per 0.984 s."""
        if not rate_per_s > 0 or not math.isfinite(rate_per_s):
            raise ValueError(f"rate must be > 0 requests/s, got {rate_per_s}")
        if not hold_s >= 0:
            raise ValueError(f"hold must be >= 0 s, got {hold_s}")
        limit = max(1, math.floor(rate_per_s))
        return cls(limit, limit / rate_per_s, hold_s)

    @property
    def spacing_s(self) -> float:
        return self.window_s / self.limit


class RateLimiter:
    """``acquire()`` blocks until one more request is allowed; thread- and process-safe.

    Every instance that shares ``key`` (and the Redis) shares the budget. Contract: make the
    request right after ``acquire()`` returns, synchronously, in the same thread; the thread's
    next ``acquire()`` (or ``done()``) tells the limiter that the request was answered.
    """

    def __init__(
        self,
        client: redis.Redis,
        rate_per_s: float,
        key: str = "nudgeflow:ratelimit:gateway",
        *,
        hold_s: float = DEFAULT_HOLD_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.budget = Budget.for_rate(rate_per_s, hold_s)
        self.rate_per_s = rate_per_s
        self.key = key
        self.sent_key = f"{key}:sent"
        self.interval_us = max(1, round(1_000_000 * self.budget.spacing_s))
        self._window_us = max(1, round(1_000_000 * self.budget.window_s))
        self._hold_us = round(1_000_000 * self.budget.hold_s)
        self._book = client.register_script(_BOOK)
        self._guard = client.register_script(_GUARD)
        self._done = client.register_script(_DONE)
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
        waited = 0.0
        while True:
            (wait_us,) = self._guard(
                keys=[self.sent_key],
                args=[self.budget.limit, self._window_us, self._hold_us, member],
            )
            if int(wait_us) == 0:
                self._local.member = member
                return waited
            waited += self._wait(int(wait_us) / 1_000_000)

    def done(self) -> None:
        """This thread's last request was answered (optional: the next ``acquire`` says it too,
        but a thread that goes idle frees its place sooner this way)."""
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


class LocalRateLimiter:
    """The same pacing and window cap in one process (backtests and tests without Redis)."""

    def __init__(self, rate_per_s: float, *, hold_s: float = DEFAULT_HOLD_S) -> None:
        self.budget = Budget.for_rate(rate_per_s, hold_s)
        self.interval_s = self.budget.spacing_s
        self._tat = 0.0
        self._scores: dict[int, float] = {}  # request number -> latest possible receipt
        self._ids = itertools.count()
        self._local = threading.local()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        now = time.monotonic()
        with self._lock:
            previous = getattr(self._local, "member", None)
            if previous in self._scores:
                self._scores[previous] = min(self._scores[previous], now)
            slot = max(now, self._tat)
            self._tat = slot + self.interval_s
        waited = max(0.0, slot - now)
        if waited > 0:
            time.sleep(waited)
        window = self.budget.window_s
        while True:
            with self._lock:
                now = time.monotonic()
                live = {k: v for k, v in self._scores.items() if v > now - window}
                self._scores = live
                if len(live) < self.budget.limit:
                    member = next(self._ids)
                    live[member] = now + self.budget.hold_s
                    self._local.member = member
                    return waited
                pause = min(live.values()) + window - now
            time.sleep(pause)
            waited += pause
