"""``Dispatcher``: one instance's loop, wiring the collaborators of this package together.

Each turn of the loop (:meth:`Dispatcher.run`): follow the contacts topic, publish finished
sends, release deferred sends now due, consume, decide the inbox in order, detect the end of
input (event clock), commit what is done. A Redis outage pauses it (:mod:`.outage`); a rebalance
finishes the in-flight sends and commits before a partition is let go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import redis
from confluent_kafka import Consumer, KafkaException, TopicPartition

from processors import metrics
from processors.core.campaign import CampaignSet
from processors.core.clock import wall_ms
from processors.core.decision import Decision, DecisionCancelled
from processors.core.policy import Policy, RetryPolicy, Step
from processors.dispatcher.deciding import Decider
from processors.dispatcher.inbox import Inbox, Item, Later
from processors.dispatcher.offsets import TP, Offsets, Ref
from processors.dispatcher.outage import REDIS_DOWN, RedisWatch, connect, store_for
from processors.dispatcher.output import Output, Stats
from processors.dispatcher.partitions import Partitions
from processors.dispatcher.sending import Sender
from processors.gateways.base import Gateway
from processors.kafka.contacts import ContactsFollower
from processors.redis import DEFAULT_PREFIX
from processors.redis.client import Client
from processors.redis.rate_limit import RateLimiter
from processors.settings import Settings
from schemas.codec import Codec

log = logging.getLogger("nudgeflow.dispatcher")

DEFAULT_RATE_PER_S = 30.0
CONSUME_MAX = 1024
"""Most records taken from the consumer at once (the inbox is refilled once empty): with a
backlog, a run of as many decisions; each run waits for its first two Redis round trips."""
RUN_MAX = 1024
"""Most consecutive decisions taken from the inbox at once (decided batch after batch)."""


class Dispatcher:
    """One dispatcher instance. ``run()`` blocks until ``stop()`` (or a signal) is called."""

    def __init__(
        self,
        settings: Settings,
        campaigns: CampaignSet,
        gateway: Gateway,
        *,
        redis_client: Client | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        threads: int = 8,
        max_in_flight: int = 64,
        retry: RetryPolicy | None = None,
        commit_interval_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.event_clock = settings.clock == "event"
        self.max_in_flight = max_in_flight
        self.stats = Stats()
        self.error: BaseException | None = None  # why run() stopped early, if it did
        self._stop = threading.Event()
        self.codec = Codec(settings.schema_registry_url)
        self.redis = redis_client or connect(settings)
        self.store = store_for(settings, self.redis, key_prefix)
        self.policy = Policy(
            campaigns,
            self.store,
            default_timezone=settings.default_timezone,
            cooldown_ms=int(settings.cooldown_s * 1000),
            event_clock=self.event_clock,
        )
        self.consumer = Consumer(settings.consumer_conf(settings.dispatcher_group))
        self.contacts = ContactsFollower(settings, self.store, self.codec, "nudgeflow-contacts")
        self.output = Output(settings, self.codec, self.stats)
        self.producer = self.output.producer
        self.watch = RedisWatch(self.redis, self.consumer, self._stop)
        self.offsets = Offsets(
            self.consumer, self.output, self.store, REDIS_DOWN, commit_interval_s
        )
        self.inbox = Inbox(self.codec)
        self.decider = Decider(self.policy, self.store, event_clock=self.event_clock)
        self.sender = Sender(
            settings,
            gateway=gateway,
            policy=self.policy,
            limiter=RateLimiter(self.redis, rate_per_s, key=f"{key_prefix}ratelimit:gateway"),
            retry=retry or RetryPolicy(),
            watch=self.watch,
            threads=threads,
        )
        self.partitions = Partitions()
        self.later = Later()  # decisions busy elsewhere
        self._last_release = 0.0

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def assigned(self) -> set[TP]:
        return self.partitions.assigned

    @property
    def redis_down(self) -> bool:
        """Whether this instance is waiting out a Redis outage."""
        return self.watch.down

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Materialize contacts, join the group, dispatch until stopped, then shut down cleanly."""
        try:
            self.watch.at_start(self.contacts.load)
            self.consumer.subscribe(
                [self.settings.topic_decisions],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
            )
            metrics.DISPATCHER_REDIS_UP.set(1)
            if ready is not None:
                ready()
            while not self._stop.is_set():
                self._step()
            if not self.watch.down:
                try:
                    self._drain()
                    self.offsets.commit(force=True)
                except REDIS_DOWN:
                    log.warning(
                        "redis unreachable at shutdown; uncommitted decisions are redelivered"
                    )
            # else: what is not committed is redelivered; the sends held in their jobs give up
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sender.close()
            self.producer.flush(10)
        finally:
            for close in (self.consumer.close, self.contacts.close):
                try:
                    close()
                except (KafkaException, RuntimeError):
                    pass
            self.gateway.close()
            log.info(
                "dispatcher stopped: %d decisions, outcomes %s",
                self.stats.decisions,
                dict(self.stats.outcomes),
            )

    # ------------------------------------------------------------------ main loop

    def _step(self) -> None:
        if self.watch.down:
            self._await_redis()
            return
        try:
            self.watch.check_jobs()
            self._work()
        except REDIS_DOWN as exc:
            self.watch.lost(exc)

    def _work(self) -> None:
        self.contacts.poll()
        self._reap(timeout=0)
        if self.later:
            self._retry_busy()
        if time.monotonic() - self._last_release > 0.2:
            # Deferred sends now due (event clock: due by the replay's time, which the other
            # partitions may have moved past a send deferred just now).
            self._last_release = time.monotonic()
            due_by = self.partitions.replay_time() if self.event_clock else wall_ms()
            if due_by is not None:
                self._release_due(due_by)
        if not self.inbox:
            for msg in self.consumer.consume(CONSUME_MAX, timeout=0.05):
                self._consume(msg)
        if len(self.sender) >= self.max_in_flight:
            self._reap(timeout=0.05)
        self._process_inbox()
        if self.event_clock and self.partitions.end_of_input():
            self._end_of_input()
        self.offsets.commit()
        self.offsets.sample_lag(self.settings)

    def _await_redis(self) -> None:
        """During an outage: keep polling (paused), publish finished jobs, probe with backoff."""
        self.watch.pause()  # also partitions assigned since the outage began
        for msg in self.consumer.consume(CONSUME_MAX, timeout=min(0.1, self.watch.backoff_s)):
            self._consume(msg)  # kept in order in the inbox
        self._reap(timeout=0)
        self.watch.probe()

    def _consume(self, msg: object) -> None:
        ref = self.inbox.add(msg)  # type: ignore[arg-type]
        if ref is not None:
            self.offsets.consumed(ref)

    def _room(self) -> int:
        return self.max_in_flight - len(self.sender)

    # ------------------------------------------------------------------ decisions

    def _process_inbox(self) -> None:
        """Handle the inbox in order; an item leaves it only once handled (a Redis error leaves
        it, and everything after it, for when Redis is back)."""
        inbox = self.inbox
        while inbox:
            if self._room() <= 0:
                return  # at most max_in_flight sends in progress: the rest waits its turn
            item = inbox.head()
            if item.kind == "decision":
                # As many decisions as there are, not just the room: most never reach the
                # gateway, and a batch stops at its room-th send.
                run = inbox.decisions_at_head(RUN_MAX)
                self.partitions.input(item.partition for item in run)
                self.decider.decide(inbox.items, run, self._room, self._now_of, self._decided)
                continue
            self._handle_item(item)
            inbox.pop()

    def _handle_item(self, item: Item) -> None:
        """A flush marker, a cancellation or an undecodable record."""
        if item.kind == "flush":
            self.partitions.flush(item.partition, item.headers)
            self.offsets.done(item.ref)
            return
        self.partitions.input([item.partition])
        if item.kind == "undecodable":
            self.stats.undecodable += 1
            key, value = item.payload
            self.output.dead_letter(key, value, "undecodable")
            self.offsets.done(item.ref)
            return
        cancel: DecisionCancelled = item.payload
        step = self.policy.on_cancel(cancel, self._now(cancel.at, item.partition))
        self.stats.cancels += 1
        self._handle(step, item.ref)

    def _decided(self, step: Step, item: Item) -> None:
        self.stats.decisions += 1
        self._handle(step, item.ref, item.payload)

    def _retry_busy(self) -> None:
        """Ask again about decisions another instance was busy with (their lease ran out)."""
        for item in self.later.due():
            queue = deque([item])
            self.decider.decide(queue, [item], lambda: 1, self._now_of, self._retried)
            if not queue:
                self.later.remove(item)  # only once handled (Redis may be gone meanwhile)

    def _retried(self, step: Step, item: Item) -> None:
        self._handle(step, item.ref, item.payload)

    def _handle(self, step: Step, ref: Ref | None, decision: Decision | None = None) -> None:
        if step.retry_after_ms is not None and decision is not None and ref is not None:
            log.info(
                "decision %s is in progress elsewhere; asking again in %d ms",
                decision.decision_id,
                step.retry_after_ms,
            )
            self.later.add(Item(ref, "decision", decision), step.retry_after_ms)
            return
        self.output.publish(step)
        if step.send is None:
            self.offsets.done(ref)
            return
        self.sender.submit(step.send, ref)

    def _reap(self, timeout: float) -> None:
        for step, ref in self.sender.reap(timeout):
            self.output.publish(step)
            self.offsets.done(ref)
        if self.sender.error is not None and self.error is None:
            self.error = self.sender.error
            self._stop.set()

    def _drain(self) -> None:
        while len(self.sender):
            self._reap(timeout=1.0)
            if self.watch.down or self.watch.jobs_wait.is_set():
                return  # jobs wait for Redis; what they hold is not committed (redelivered)

    # ------------------------------------------------------------------ clocks and deferred sends

    def _release_due(self, now_ms: int | None) -> int:
        """Deferred sends now due, claimed from the backlog every instance shares, each handled
        as soon as it is evaluated; returns how many were."""
        handled = 0
        for decision, due in self.store.claim_due(now_ms, 256):
            step = self.policy.release_one(decision, due, now_ms)
            if step is None:
                continue
            self.output.counters.released(step)
            self._handle(step, None)
            handled += 1
        return handled

    def _now_of(self, item: Item) -> int:
        return self._now(item.payload.fire_at, item.partition)

    def _now(self, item_time: int, partition: int) -> int:
        """Evaluation time of an item read from ``partition``; with the event clock also
        releases the deferred sends due by the replay's time (``Partitions.replay_time``)."""
        if not self.event_clock:
            return wall_ms()
        self.partitions.observe(partition, item_time)
        replay_time = self.partitions.replay_time()
        if replay_time is not None:
            self._release_due(replay_time)
        return item_time

    # ------------------------------------------------------------------ partitions

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions.assign((tp.topic, tp.partition) for tp in partitions)
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish in-flight sends and commit before another instance takes the partitions."""
        try:
            self._drain()
            self.offsets.commit(force=True, revoking=True)
        except RuntimeError as exc:
            log.error("%s", exc)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.partitions.revoke(gone)
        for tp in gone:
            self.offsets.forget(tp)
        self.later.drop(gone)
        self.inbox.drop(gone)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    # ------------------------------------------------------------------ end of input

    def _end_of_input(self) -> None:
        """Event clock: every partition is flushed. Release all deferred sends, mark the end."""
        self._drain_all()
        while self._release_due(None):
            self._drain_all()
        self.offsets.commit(force=True)
        self.output.end_markers(sorted(p for _t, p in self.assigned))
        self.partitions.ended = True
        self.stats.end_of_input += 1
        log.info(
            "end of input: deferred sends released; markers for %d source partition(s) written",
            len(self.assigned),
        )

    def _drain_all(self) -> None:
        """Every send finished, or an outage (end of input waits for it: markers go last)."""
        self._drain()
        if len(self.sender):
            raise redis.exceptions.ConnectionError("send jobs are waiting for redis")
