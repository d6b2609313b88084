"""The shared gateway rate limit against a real redis-server: no sliding window ever holds more
than ``limit`` arrivals, however late requests reach the gateway after their admission."""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left

import redis

from processors.redis.rate_limit import RateLimiter


def busiest_window(times: list[float], width: float) -> int:
    """Most arrivals in any half-open window ``[t, t + width)``."""
    ts = sorted(times)
    return max((bisect_left(ts, t + width) - i for i, t in enumerate(ts)), default=0)


def test_no_window_holds_more_than_limit_with_late_and_jittered_arrivals(
    redis_client: redis.Redis,
) -> None:
    """Three "processes" (limiter instances on one key), five threads each, for ~3 s. Between
    its admission and its arrival at the gateway a request waits 0-20 ms, and one in five waits
    0.3-0.6 s (a write delayed by CPU contention, a slow TLS connection); the answer comes 5-15 ms
    after the arrival. Some threads report it with done(), the others only by acquiring again.
    A limiter that stops counting a request before it is answered lets late arrivals bunch up
    with punctual ones (the previous one, 250 ms, let 21-22 into a second here: 3 of 3 runs)."""
    rate, seconds = 20, 3.0
    limiters = [RateLimiter(redis_client, rate, key="test:rl") for _ in range(3)]
    arrivals: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(limiter: RateLimiter, seed: int, reports: bool) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            limiter.acquire()
            late = rng.random() < 0.2
            time.sleep(rng.uniform(0.3, 0.6) if late else rng.uniform(0.0, 0.02))
            with lock:
                arrivals.append(time.time())  # Redis TIME is this host's wall clock too
            time.sleep(rng.uniform(0.005, 0.015))
            if reports:
                limiter.done()

    threads = [
        threading.Thread(target=caller, args=(limiters[n % 3], n, n % 2 == 0)) for n in range(15)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    busiest = busiest_window(arrivals, 1.0)
    print(f"{len(arrivals)} arrivals in ~{seconds:.0f} s; busiest sliding second {busiest}")
    assert len(arrivals) > 2 * rate  # several full windows were exercised
    assert busiest <= rate


def test_a_request_counts_until_its_answer_plus_one_window(redis_client: redis.Redis) -> None:
    """Limit 2 per second: two requests still in flight block a third past their window; once
    one is answered, the third goes out one window after that answer, not before."""
    limiter = RateLimiter(redis_client, 2, key="test:rl-lease")
    ready = threading.Barrier(3)
    answer = threading.Event()
    answered_at: list[float] = []
    admitted_at: list[float] = []

    def in_flight(reports: bool) -> None:
        limiter.acquire()
        ready.wait()
        answer.wait(10)
        if reports:
            answered_at.append(time.monotonic())
            limiter.done()

    def third_request() -> None:
        limiter.acquire()
        admitted_at.append(time.monotonic())

    holders = [threading.Thread(target=in_flight, args=(n == 0,)) for n in range(2)]
    for th in holders:
        th.start()
    ready.wait()
    third = threading.Thread(target=third_request)
    third.start()
    third.join(1.4)  # past the 1 s window of both admissions
    assert third.is_alive(), "admitted while two requests were still in flight"
    answer.set()  # one holder reports its answer; the other stays in flight
    third.join(5)
    for th in holders:
        th.join(5)
    assert admitted_at, "never admitted after an answer"
    assert admitted_at[0] - answered_at[0] >= 0.95  # the answered request counted for a window
