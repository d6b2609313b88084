"""A Redis outage: noticed, waited out with backoff, and ended when Redis answers again.

While Redis is away the dispatcher pauses its partitions (it keeps polling, so it stays in its
group), keeps every consumed but undecided record in order, makes no gateway call (a send job
waits before each Redis step), commits nothing past what is done and sets
``nudgeflow_dispatcher_redis_up`` to 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaException
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from processors import metrics
from processors.redis import RedisStore
from processors.redis.client import Client, ping
from processors.redis.client import connect as connect_url
from processors.settings import Settings

log = logging.getLogger("nudgeflow.dispatcher")

PROBE_MAX_S = 1.0
"""Longest wait between Redis probes (and retries) in an outage: the dispatcher resumes at most
this long after Redis answers again; a ping a second costs nothing."""

REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,  # a cluster's failover in progress
    redis.exceptions.TryAgainError,  # a cluster's slot migration in progress
    redis.exceptions.SlotNotCoveredError,
)
"""Redis errors that mean "unreachable for now" (an outage), not a bug."""


def connect(settings: Settings) -> Client:
    """The dispatcher's Redis client (a single Redis or a cluster, by the URL's scheme): few,
    short retries (an outage is handled by pausing, not by stalling every call for seconds)."""
    return connect_url(
        settings.redis_url, retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2)
    )


def store_for(settings: Settings, client: Client, key_prefix: str) -> RedisStore:
    """The store, with a call lease of the longest one attempt can take (requests applies the
    timeout to connect and to read) plus slack: a duplicate of a decision on another instance
    waits this long before it takes a "calling" state for a crash."""
    return RedisStore(
        client, key_prefix, call_lease_ms=int((2 * settings.vonage_timeout_s + 5) * 1000)
    )


class RedisWatch:
    """Whether Redis is down, and the waiting that goes with it (thread-safe where noted)."""

    def __init__(self, client: Client, consumer: Consumer, stop: threading.Event) -> None:
        self.client = client
        self.consumer = consumer
        self.stop = stop
        self.down_since: float | None = None  # monotonic; None while Redis answers
        self._probe_at = 0.0
        self.backoff_s = 0.1
        self.jobs_wait = threading.Event()  # a send job met an outage first

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def check_jobs(self) -> None:
        """A send job met a Redis error: find out whether it is an outage (raises if so)."""
        if self.jobs_wait.is_set():
            self.jobs_wait.clear()
            ping(self.client)

    def lost(self, exc: BaseException) -> None:
        """Stop taking records (group membership stays), remember to probe Redis."""
        self.down_since = time.monotonic()
        self.backoff_s = 0.1
        self._probe_at = time.monotonic() + self.backoff_s
        metrics.DISPATCHER_REDIS_UP.set(0)
        log.warning(
            "redis unreachable (%s); consumption paused, no texts are sent until it is back",
            type(exc).__name__,
        )
        self.pause()

    def pause(self, resume: bool = False) -> None:
        """Pause the assigned partitions (or resume them)."""
        try:
            parts = self.consumer.assignment()
            if parts:
                (self.consumer.resume if resume else self.consumer.pause)(parts)
        except KafkaException as exc:
            log.warning("could not %s partitions: %s", "resume" if resume else "pause", exc)

    def probe(self) -> bool:
        """During an outage: ping Redis when the backoff allows; True once it answers (the
        partitions are resumed)."""
        if time.monotonic() < self._probe_at:
            return False
        try:
            ping(self.client)
        except REDIS_DOWN:
            self.backoff_s = min(PROBE_MAX_S, self.backoff_s * 2)
            self._probe_at = time.monotonic() + self.backoff_s
            return False
        down_s = time.monotonic() - (self.down_since or time.monotonic())
        self.down_since = None
        metrics.DISPATCHER_REDIS_UP.set(1)
        self.pause(resume=True)
        log.warning("redis is back after %.1f s; resuming where dispatching stopped", down_s)
        return True

    def until_up(self, call: Callable[[], Any]) -> Any:
        """In a send job (thread-safe): ``call()``, waiting out a Redis outage (every store step
        of a send is safe to repeat). Gives up only when the dispatcher stops (the decision is
        redelivered)."""
        delay = 0.05
        while True:
            try:
                return call()
            except REDIS_DOWN:
                self.jobs_wait.set()
                if self.stop.is_set():
                    raise
                time.sleep(delay)
                delay = min(PROBE_MAX_S, delay * 2)

    def at_start(self, call: Callable[[], Any]) -> Any:
        """``call()`` at start-up, waiting out a Redis outage (fail closed: nothing is consumed
        or sent before Redis answers) instead of exiting."""
        delay = 0.1
        while True:
            try:
                return call()
            except REDIS_DOWN as exc:
                if self.stop.is_set():
                    raise
                if delay == 0.1:
                    metrics.DISPATCHER_REDIS_UP.set(0)
                    log.warning(
                        "redis unreachable at start-up (%s); waiting for it", type(exc).__name__
                    )
                time.sleep(delay)
                delay = min(PROBE_MAX_S, delay * 2)
