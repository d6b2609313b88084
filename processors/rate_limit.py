"""The gateway rate limit shared by every dispatcher instance: GCRA slots in Redis.

Vonage accepts 30 requests/s per account by default; more gets status 1 (throttled). Each
caller atomically books the next free slot (``slot = max(now, tat); tat = slot + interval``, with
Redis' own clock so hosts with skewed clocks agree) and sleeps until it. Slots are spaced evenly,
so no 1-second window holds more than ``rate`` requests; ``margin`` stretches the interval a
little so network jitter between us and the gateway cannot push a 31st request into a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

_BOOK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, tat)
local nxt = slot + tonumber(ARGV[1])
-- keep the key until every booked slot has passed, plus a second
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1000)
return {string.format('%d', slot - now)}
"""


class RateLimiter:
    """``acquire()`` blocks until one more request is allowed; thread- and process-safe."""

    def __init__(
        self,
        client: redis.Redis,
        rate_per_s: float,
        key: str = "nudgeflow:ratelimit:gateway",
        *,
        margin: float = 0.1,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        self.key = key
        self.interval_us = max(1, round(1_000_000 * (1 + margin) / rate_per_s))
        self._script = client.register_script(_BOOK)
        self._sleep = sleep
        self.waited_s = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Book a slot and wait for it; returns the seconds waited."""
        (wait_us,) = self._script(keys=[self.key], args=[self.interval_us])
        wait = int(wait_us) / 1_000_000
        if wait > 0:
            self._sleep(wait)
            with self._lock:
                self.waited_s += wait
        return wait


class LocalRateLimiter:
    """The same slot booking in one process (backtests and tests without Redis)."""

    def __init__(self, rate_per_s: float, *, margin: float = 0.1) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate_per_s}")
        self.interval_s = (1 + margin) / rate_per_s
        self._tat = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._tat)
            self._tat = slot + self.interval_s
        wait = slot - now
        if wait > 0:
            time.sleep(wait)
        return wait
