"""``nudgeflow dispatcher``: decisions in, texts out, one ``SmsOutcome`` per decision.

The shell around :mod:`processors.core.policy`: a confluent-kafka consumer group on the decisions
topic, the ``contacts`` topic materialized into Redis, a :class:`~processors.redis.RedisStore`
shared with every other instance, a Redis rate limit, and gateway calls in a bounded thread pool
(the Vonage SDK is synchronous; one slow call must not stall the consumer).

Delivery guarantees: an offset is committed only after the outcomes (and dead letters) of every
decision before it are produced and flushed. A crash before that redelivers the decision; the
store's reservation makes sure the gateway is never called twice for it (``failed:
unknown_after_crash`` when the first call's result was lost), and a redelivered decision whose
outcome was recorded but never confirmed published is re-published with its dead letter. On a
rebalance the instance finishes its in-flight sends and commits before it lets go of a partition.

Throughput (live clock): consecutive decisions are decided in batches of two Lua script calls
(``RedisStore.prepare_many``: reservation and reads; ``settle_many``: outcome records and atomic
cap checks, in order), so one user's decisions in a batch see each other's cap reservations
exactly as they would one at a time. A batch is not limited to ``max_in_flight`` (most decisions
never reach the gateway): its settle step stops after the text that fills the room for sends,
and the rest is prepared again later with the same attempt tokens. A batch's settle and the next
batch's reads go to Redis together, and Redis runs them while the previous batch's outcomes are
published (``_decide_run``). Event-clock replays decide one at a
time (deferred sends are released between decisions, in replay time).

Redis outage: a connection error or timeout pauses the assigned partitions (the consumer keeps
polling, so the instance stays in its group), keeps every consumed but undecided record in order,
makes no gateway call (a send job waits before each Redis step), commits nothing past what is
done, sets ``nudgeflow_dispatcher_redis_up`` to 0, and probes Redis with backoff; when it
answers, the partitions resume where they were.

Clocks: live, "now" is the wall clock. With ``NUDGEFLOW_CLOCK=event`` (replays) "now" is each
decision's ``fire_at``; deferred sends are released when the replay's time passes their due time
(the time every assigned partition has reached: a partition read ahead of the others must not
release a text whose exit is still on its way on a partition behind), and when a
``nudgeflow-control: flush`` record has been seen on every assigned partition (end of input) all
remaining deferred sends are released and a flush marker is written to every partition of the
outcomes topic.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from processors import arguments, metrics
from processors.core.campaign import CampaignError, CampaignSet, load_campaigns
from processors.core.clock import SourceTimes
from processors.core.decision import Decision, DecisionCancelled
from processors.core.links import LinkShortener
from processors.core.outcome import SmsOutcome
from processors.core.policy import (
    CapCheck,
    Final,
    Pending,
    Policy,
    RetryPolicy,
    SendPlan,
    Step,
    deliver,
    with_send_time,
)
from processors.gateways.base import Gateway, GatewayError, SendResult, SmsMessage
from processors.kafka.control import CONTROL_HEADER, FLUSH, FlushTracker, flush_headers, header
from processors.redis import DEFAULT_PREFIX, RedisStore, SentBatch
from processors.redis.rate_limit import RateLimiter
from processors.settings import Settings
from schemas.codec import Codec, CodecError

log = logging.getLogger("nudgeflow.dispatcher")

DLQ_REASON_HEADER = "nudgeflow-dlq-reason"
DEFAULT_RATE_PER_S = 30.0
BATCH_MAX = 500
"""Most records taken from the consumer at once."""
DECIDE_BATCH_MAX = 128
"""Most decisions decided together (live clock): one Lua script call per phase, so Redis is
busy with one batch for a few milliseconds at most."""
DECIDE_RUN_MAX = 1024
"""Most consecutive decisions taken from the inbox at once, decided batch after batch with
Redis working on one batch while the previous one is published."""
REDIS_PROBE_MAX_S = 5.0

REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
"""Redis errors that mean "unreachable for now" (an outage), not a bug."""

TP = tuple[str, int]

_BY_REASON = {
    "suppressed": metrics.SMS_SUPPRESSED,
    "failed": metrics.SMS_FAILED,
    "cancelled": metrics.SMS_CANCELLED,
}


@dataclass(slots=True)
class _Item:
    """A consumed decisions-topic record, decoded, waiting (in order) to be handled."""

    ref: tuple[TP, int]
    kind: str  # "decision" | "cancel" | "flush" | "undecodable"
    payload: Any = None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    token: str | None = None  # a decision's attempt token, once a batch has reserved it


class _Settled:
    """A batch of decisions whose settle step has run: what ``_handle_settled`` publishes."""

    __slots__ = ("items", "pending", "results", "cut", "passes")

    def __init__(
        self,
        items: list[_Item],
        pending: list[Pending],
        results: list[tuple[int | None, bool]],
    ) -> None:
        self.items, self.pending, self.results = items, pending, results
        self.cut = len(items)
        self.passes = 0  # cap checks that passed with a reservation: texts to send
        ran = 0
        for i, p in enumerate(pending):
            if not isinstance(p, (Final, CapCheck)):
                continue
            if ran == len(results):  # the settle step stopped at the room-th send
                self.cut = i
                break
            if isinstance(p, CapCheck) and p.reserve and results[ran][0] is None:
                self.passes += 1
            ran += 1


def make_gateway(settings: Settings) -> Gateway:
    """The gateway ``settings.gateway`` names (``outbox`` or ``vonage``)."""
    if settings.gateway == "outbox":
        from processors.gateways.outbox import OutboxGateway

        # The console echo shows each text: on a terminal only. Redirected, stdout is a log
        # (e.g. the demo's logs/dispatcher.log), and texts never go into logs.
        echo = print if sys.stdout.isatty() else None
        return OutboxGateway(settings.outbox_path, echo=echo)
    from processors.gateways.vonage import VonageGateway

    if settings.vonage_api_key is None or settings.vonage_api_secret is None:
        raise ValueError(
            "the vonage gateway needs NUDGEFLOW_VONAGE_API_KEY and NUDGEFLOW_VONAGE_API_SECRET"
        )
    return VonageGateway(
        settings.vonage_api_key,
        settings.vonage_api_secret,
        settings.vonage_from,
        rest_host=settings.vonage_rest_host,
        timeout_s=settings.vonage_timeout_s,
    )


def _where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (never None for one without error)."""
    return msg.topic() or "", msg.partition() or 0, msg.offset() or 0


def _headers(msg: Message) -> list[tuple[str, bytes | None]]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Stats:
    """Counts by status and reason (log-safe: no ids, numbers or text)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    decisions: int = 0
    cancels: int = 0
    undecodable: int = 0
    end_of_input: int = 0


class Dispatcher:
    """One dispatcher instance. ``run()`` blocks until ``stop()`` (or a signal) is called."""

    def __init__(
        self,
        settings: Settings,
        campaigns: CampaignSet,
        gateway: Gateway,
        *,
        redis_client: redis.Redis | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        threads: int = 8,
        max_in_flight: int = 64,
        retry: RetryPolicy | None = None,
        commit_interval_s: float = 0.2,
    ) -> None:
        self.settings = settings
        self._deferred_ids: set[str] = set()  # for the nudgeflow_sms_deferred gauge
        self._by_reason: dict[tuple[str, str, str], Any] = {}  # metric children (_count)
        self._released_ids: set[str] = set()  # claimed from the shared deferred backlog here
        self._last_lag = 0.0
        self.gateway = gateway
        self.event_clock = settings.clock == "event"
        self.codec = Codec(settings.schema_registry_url)
        self.redis = redis_client or redis.Redis.from_url(
            settings.redis_url,
            # Few, short retries: a Redis outage is handled by pausing (see the module doc),
            # not by stalling every call for seconds.
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), 2),
        )
        self.store = RedisStore(
            self.redis,
            key_prefix,
            # The longest one attempt can take (requests applies the timeout to connect and to
            # read), plus slack: a duplicate of this decision on another instance waits this
            # long before it takes a "calling" state for a crash.
            call_lease_ms=int((2 * settings.vonage_timeout_s + 5) * 1000),
        )
        self.policy = Policy(
            campaigns,
            self.store,
            default_timezone=settings.default_timezone,
            cooldown_ms=int(settings.cooldown_s * 1000),
            event_clock=self.event_clock,
        )
        self.limiter = RateLimiter(self.redis, rate_per_s, key=f"{key_prefix}ratelimit:gateway")
        link_secret = settings.link_secret.get_secret_value() if settings.link_secret else None
        self.links = LinkShortener.maybe(
            self.store, settings.link_base_url, settings.link_ttl_s, link_secret
        )
        self.retry = retry or RetryPolicy()
        self.max_in_flight = max_in_flight
        self.commit_interval_s = commit_interval_s
        self.stats = Stats()
        self.error: BaseException | None = None  # why run() stopped early, if it did
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway")
        self._stop = threading.Event()
        self._futures: dict[Future[Step], TP | None] = {}
        self._later: list[tuple[float, Decision, tuple[TP, int]]] = []  # busy elsewhere
        self._inbox: deque[_Item] = deque()  # consumed, not yet handled (in order)
        self._contact_inbox: deque[Message] = deque()
        self._redis_down_since: float | None = None  # monotonic; None while Redis answers
        self._redis_probe_at = 0.0
        self._redis_backoff_s = 0.1
        self._jobs_wait_for_redis = threading.Event()  # a send job met an outage first
        # offset -> False until handled, then the stamp of its output (see _done)
        self._pending: dict[TP, dict[int, int | bool]] = {}
        self._produced = 0  # records handed to the producer so far (each one's sequence number)
        self._undelivered: set[int] = set()  # sequence numbers without a delivery report yet
        self._to_mark: list[tuple[str, str, str]] = []  # delivered outcomes (Redis "emitted")
        self._delivery_errors: list[str] = []
        self._assigned: set[TP] = set()
        self._flushes = FlushTracker()
        self._ended = False
        self._times = SourceTimes()  # event clock: the replay's time per partition
        self._last_commit = 0.0
        self._last_release = 0.0
        self.producer = Producer(
            {**settings.kafka_common(), "enable.idempotence": True, "linger.ms": 5}
        )
        self.consumer = Consumer(settings.consumer_conf(settings.dispatcher_group))
        self.contacts = Consumer(
            {
                **settings.kafka_common(),
                "group.id": f"nudgeflow-contacts-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Materialize contacts, join the group, dispatch until stopped, then shut down cleanly."""
        try:
            self._load_contacts_when_redis_is_up()
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
            if self._redis_down_since is None:
                try:
                    self._drain()
                    self._commit(force=True)
                except REDIS_DOWN:
                    log.warning(
                        "redis unreachable at shutdown; uncommitted decisions are redelivered"
                    )
            # else: what is not committed is redelivered; the sends held in their jobs give up
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=False)
            self.producer.flush(10)
        finally:
            for consumer in (self.consumer, self.contacts):
                try:
                    consumer.close()
                except (KafkaException, RuntimeError):
                    pass
            self.gateway.close()
            log.info(
                "dispatcher stopped: %d decisions, outcomes %s",
                self.stats.decisions,
                dict(self.stats.outcomes),
            )

    # ------------------------------------------------------------------ contacts

    def load_contacts(self, timeout_s: float = 30.0) -> int:
        """Read the contacts topic to its current end (no group), then keep it assigned."""
        topic = self.settings.topic_contacts
        meta = self.contacts.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise RuntimeError(f"contacts topic {topic!r} does not exist")
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        self.contacts.assign(parts)
        ends: dict[int, int] = {}
        for tp in parts:
            low, high = self.contacts.get_watermark_offsets(tp, timeout=10)
            if high > low:
                ends[tp.partition] = high
        deadline = time.monotonic() + timeout_s
        loaded = 0
        while ends and time.monotonic() < deadline:
            for msg in self.contacts.consume(1000, timeout=0.5):
                if msg.error() is None:
                    loaded += self._apply_contact(msg)
                    _topic, partition, offset = _where(msg)
                    if offset + 1 >= ends.get(partition, 0):
                        ends.pop(partition, None)
        if ends:
            raise RuntimeError(f"could not read the contacts topic to its end in {timeout_s:.0f}s")
        log.info("contacts materialized: %d profiles", loaded)
        return loaded

    def _load_contacts_when_redis_is_up(self) -> None:
        """:meth:`load_contacts`, waiting out a Redis outage at start-up (fail closed: nothing
        is consumed or sent before Redis answers) instead of exiting."""
        delay = 0.1
        while True:
            try:
                self.load_contacts()
                return
            except REDIS_DOWN as exc:
                if self._stop.is_set():
                    raise
                if delay == 0.1:
                    metrics.DISPATCHER_REDIS_UP.set(0)
                    log.warning(
                        "redis unreachable at start-up (%s); waiting for it", type(exc).__name__
                    )
                time.sleep(delay)
                delay = min(REDIS_PROBE_MAX_S, delay * 2)

    def _poll_contacts(self) -> None:
        if not self._contact_inbox:
            self._contact_inbox.extend(self.contacts.consume(1000, timeout=0))
        while self._contact_inbox:
            msg = self._contact_inbox[0]
            if msg.error() is None:
                self._apply_contact(msg)  # kept until stored: a Redis outage loses none
            self._contact_inbox.popleft()

    def _apply_contact(self, msg: Message) -> int:
        key = msg.key()
        if key is None:
            return 0
        user_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        value = msg.value()
        _topic, _partition, offset = _where(msg)
        if value is None:
            self.store.put_contact(user_id, None, offset)
            return 0
        try:
            name, record = self.codec.decode(value)
        except CodecError as exc:
            log.warning("skipping undecodable contact at offset %d: %s", offset, exc)
            return 0
        if name != "ContactProfile":
            return 0
        self.store.put_contact(user_id, record, offset)
        return 1

    # ------------------------------------------------------------------ main loop

    def _step(self) -> None:
        if self._redis_down_since is not None:
            self._await_redis()
            return
        try:
            if self._jobs_wait_for_redis.is_set():
                self._jobs_wait_for_redis.clear()
                self.redis.ping()  # a send job met an error: is this an outage?
            self._work()
        except REDIS_DOWN as exc:
            self._redis_lost(exc)

    def _work(self) -> None:
        self._poll_contacts()
        self._reap(timeout=0)
        if self._later:
            self._retry_busy()
        if time.monotonic() - self._last_release > 0.2:
            # Deferred sends now due (event clock: due by the replay's time, which the other
            # partitions may have moved past a send deferred just now).
            self._last_release = time.monotonic()
            if not self.event_clock:
                self._release_due(_wall_ms())
            else:
                replay_time = self._replay_time()
                if replay_time is not None:
                    self._release_due(replay_time)
        if not self._inbox:
            for msg in self.consumer.consume(BATCH_MAX, timeout=0.05):
                self._on_message(msg)
        if len(self._futures) >= self.max_in_flight:
            self._reap(timeout=0.05)
        self._process_inbox()
        if (
            self.event_clock
            and not self._ended
            and self._assigned
            and self._flushes.all_complete(p for _t, p in self._assigned)
        ):
            self._end_of_input()
        self._commit()
        self._sample_lag()

    # ------------------------------------------------------------------ Redis outage

    def _redis_lost(self, exc: BaseException) -> None:
        """Stop taking records (group membership stays), remember to probe Redis."""
        self._redis_down_since = time.monotonic()
        self._redis_backoff_s = 0.1
        self._redis_probe_at = time.monotonic() + self._redis_backoff_s
        metrics.DISPATCHER_REDIS_UP.set(0)
        log.warning(
            "redis unreachable (%s); consumption paused, no texts are sent until it is back",
            type(exc).__name__,
        )
        self._pause()

    def _pause(self) -> None:
        try:
            parts = self.consumer.assignment()
            if parts:
                self.consumer.pause(parts)
        except KafkaException as exc:
            log.warning("could not pause partitions: %s", exc)

    def _await_redis(self) -> None:
        """During an outage: keep polling (paused), publish finished jobs, probe with backoff."""
        self._pause()  # also partitions assigned since the outage began
        for msg in self.consumer.consume(BATCH_MAX, timeout=min(0.1, self._redis_backoff_s)):
            self._on_message(msg)  # kept in order in the inbox
        self._reap(timeout=0)
        if time.monotonic() < self._redis_probe_at:
            return
        try:
            self.redis.ping()
        except REDIS_DOWN:
            self._redis_backoff_s = min(REDIS_PROBE_MAX_S, self._redis_backoff_s * 2)
            self._redis_probe_at = time.monotonic() + self._redis_backoff_s
            return
        down_s = time.monotonic() - (self._redis_down_since or time.monotonic())
        self._redis_down_since = None
        metrics.DISPATCHER_REDIS_UP.set(1)
        try:
            parts = self.consumer.assignment()
            if parts:
                self.consumer.resume(parts)
        except KafkaException as exc:
            log.warning("could not resume partitions: %s", exc)
        log.warning("redis is back after %.1f s; resuming where dispatching stopped", down_s)

    def _until_redis(self, call: Callable[[], Any]) -> Any:
        """In a send job: ``call()``, waiting out a Redis outage (every store step of a send is
        safe to repeat). Gives up only when the dispatcher stops (the decision is redelivered)."""
        delay = 0.05
        while True:
            try:
                return call()
            except REDIS_DOWN:
                self._jobs_wait_for_redis.set()
                if self._stop.is_set():
                    raise
                time.sleep(delay)
                delay = min(REDIS_PROBE_MAX_S, delay * 2)

    # ------------------------------------------------------------------ decisions

    def _on_message(self, msg: Message) -> None:
        """Decode a consumed record into the inbox (no Redis here)."""
        err = msg.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str())
            return
        topic, partition, offset = _where(msg)
        tp = (topic, partition)
        self._pending.setdefault(tp, {})[offset] = False
        ref = (tp, offset)
        headers = _headers(msg) if msg.headers() else []
        if headers and header(headers, CONTROL_HEADER) == FLUSH:
            self._inbox.append(_Item(ref, "flush", headers=headers))
            return
        try:
            name, record = self.codec.decode(msg.value())
            if name == "TriggerDecision":
                item = _Item(ref, "decision", Decision.from_record(record))
            elif name == "DecisionCancelled":
                item = _Item(ref, "cancel", DecisionCancelled.from_record(record))
            else:
                raise CodecError(f"unexpected {name} record on the decisions topic")
        except (CodecError, KeyError, TypeError, ValueError) as exc:
            log.warning("dead-lettering undecodable record at %s[%d]@%d: %s", *tp, offset, exc)
            key = msg.key()
            key_b = key.encode() if isinstance(key, str) else key
            item = _Item(ref, "undecodable", (key_b, msg.value()))
        self._inbox.append(item)

    def _process_inbox(self) -> None:
        """Handle the inbox in order; an item leaves it only once handled (a Redis error leaves
        it, and everything after it, for when Redis is back)."""
        while self._inbox:
            room = self.max_in_flight - len(self._futures)
            if room <= 0:
                return  # at most max_in_flight sends in progress: the rest waits its turn
            item = self._inbox[0]
            if item.kind == "decision" and not self.event_clock:
                # As many decisions as there are, not just `room`: most never reach the
                # gateway, and a batch stops at its room-th send.
                run: list[_Item] = []
                for queued in self._inbox:
                    if queued.kind != "decision" or len(run) >= DECIDE_RUN_MAX:
                        break
                    run.append(queued)
                self._decide_run(run)
                continue
            self._handle_item(item)
            self._inbox.popleft()

    def _handle_item(self, item: _Item) -> None:
        tp, offset = item.ref
        partition = tp[1]
        if item.kind == "flush":
            self._flushes.observe(partition, item.headers)
            self._done(item.ref)
            return
        if self._flushes.complete(partition):
            # New input after an end of input: this partition is open again.
            self._flushes.seen.pop(partition, None)
            self._flushes.expected.pop(partition, None)
        self._ended = False
        if item.kind == "undecodable":
            self.stats.undecodable += 1
            key, value = item.payload
            self._dead_letter(key, value, "undecodable")
            self._done(item.ref)
        elif item.kind == "decision":
            decision: Decision = item.payload
            step = self.policy.on_decision(decision, self._now(decision.fire_at, partition))
            self.stats.decisions += 1
            self._handle(step, item.ref, decision)
        else:
            cancel: DecisionCancelled = item.payload
            step = self.policy.on_cancel(cancel, self._now(cancel.at, partition))
            self.stats.cancels += 1
            self._handle(step, item.ref)

    def _decide_run(self, run: list[_Item]) -> None:
        """Live clock: the policy for consecutive decisions at the head of the inbox, in batches
        of two Redis script calls each (see the module doc); same outcomes as one at a time.

        Pipelined on one connection, without a helper thread: once a batch's policy is done up
        to the cap checks, its ``settle_many`` and the next batch's ``prepare_many`` are written
        to Redis together (:meth:`RedisStore.send_batch`), and while Redis runs them the previous
        batch's outcomes are published here; then their replies are read. So Redis sees
        prepare, settle, prepare, settle, ... as with one batch after the other. The store calls
        that follow a passed cap check with a reservation (a text to send: first-text claim,
        release of the caps of a text that cannot be rendered) must come before the next
        batch's cap checks, so a batch with such a pass is published before the next batch's
        settle is sent (sends are rare next to suppressions); other single calls (deferral,
        final records of quiet-hours drops) may come after the next batch's reservations, as
        within one batch.

        A batch's settle step stops after the ``room``-th text to send; the decisions after it
        stay in the inbox, reserved with their attempt's token, and the next call prepares them
        again with that token (the store knows it as its own attempt, not a busy one). On an
        error every decision not yet handled stays in the inbox (reserved, maybe settled: a
        retry re-publishes a recorded outcome, see ``Policy.after_begin``)."""
        for item in run:
            if self._flushes.complete(item.ref[0][1]):
                self._flushes.seen.pop(item.ref[0][1], None)
                self._flushes.expected.pop(item.ref[0][1], None)
        self._ended = False
        policy, store = self.policy, self.store
        for item in run:
            if item.token is None:
                item.token = policy.token()
        chunks = [run[i : i + DECIDE_BATCH_MAX] for i in range(0, len(run), DECIDE_BATCH_MAX)]
        tokens = [[(item.payload, item.token or "") for item in chunk] for chunk in chunks]
        if self.max_in_flight - len(self._futures) <= 0:
            return  # the rest waits its turn
        reads = store.prepare_many(tokens[0])
        ready: _Settled | None = None  # settled, not yet handled
        sent: SentBatch | None = None
        try:
            for k, chunk in enumerate(chunks):
                now = _wall_ms()
                pending = [
                    policy.after_begin(d, now, token, prior, prefetched)
                    for (d, token), (prior, prefetched) in zip(tokens[k], reads, strict=True)
                ]
                to_settle = [p for p in pending if isinstance(p, (Final, CapCheck))]
                if ready is not None and ready.passes:
                    self._handle_settled(ready)  # its sends' store calls come first
                    ready = None
                room = self.max_in_flight - len(self._futures)
                if room <= 0:
                    break  # the rest waits its turn (reserved, prepared again later)
                sent = store.send_batch(
                    to_settle, room, tokens[k + 1] if k + 1 < len(chunks) else []
                )
                if ready is not None:
                    self._handle_settled(ready)  # while Redis works
                    ready = None
                results, reads = sent.result()
                sent = None
                ready = _Settled(chunk, pending, results)
                if ready.cut < len(chunk):
                    break  # stopped at the room-th send
            if ready is not None:
                self._handle_settled(ready)
        finally:
            if sent is not None:
                sent.discard()  # an error above: the replies are not needed (see the doc)

    def _handle_settled(self, batch: _Settled) -> None:
        """Publish a settled batch (up to its cut), each decision leaving the inbox as handled."""
        policy, inbox = self.policy, self._inbox
        settled = iter(batch.results)
        for item, p in zip(batch.items[: batch.cut], batch.pending, strict=False):
            violated, recorded = (
                next(settled) if isinstance(p, (Final, CapCheck)) else (None, False)
            )
            # A passed cap check continues here with single calls; a Redis error leaves this
            # item (and the rest) in the inbox, and a retry finds its state as it was left.
            step = policy.settled(p, violated, recorded)
            self.stats.decisions += 1
            inbox.popleft()
            self._handle(step, item.ref, item.payload)

    def _retry_busy(self) -> None:
        """Ask again about decisions another instance was busy with (their lease ran out)."""
        now = time.monotonic()
        for entry in [item for item in self._later if item[0] <= now]:
            _at, decision, ref = entry
            step = self.policy.on_decision(decision, self._now(decision.fire_at, ref[0][1]))
            self._later.remove(entry)  # only once handled (Redis may be gone meanwhile)
            self._handle(step, ref, decision)

    def _release_due(self, now_ms: int | None) -> int:
        """Deferred sends now due, claimed from the backlog every instance shares, each handled
        as soon as it is evaluated; returns how many were. Their ids are kept so that this
        instance counts the deferred gauge down, also for a send another instance deferred (the
        sum over dispatchers is the backlog)."""
        handled = 0
        for decision, due in self.store.claim_due(now_ms, 256):
            step = self.policy.release_one(decision, due, now_ms)
            if step is None:
                continue
            if step.send is not None:
                self._released_ids.add(step.send.decision.decision_id)
            self._released_ids.update(o.decision_id for o in step.outcomes)
            self._handle(step, None)
            handled += 1
        return handled

    def _now(self, item_time: int, partition: int) -> int:
        """Evaluation time of an item read from ``partition``; with the event clock also
        releases the deferred sends due by the replay's time (:meth:`_replay_time`)."""
        if not self.event_clock:
            return _wall_ms()
        self._times.observe(partition, item_time)
        replay_time = self._replay_time()
        if replay_time is not None:
            self._release_due(replay_time)
        return item_time

    def _replay_time(self) -> int | None:
        """Event clock: the time every assigned partition not at its end of input has reached
        (None: one has delivered nothing yet). A held send is released only then, so an exit
        for it, which comes on its user's partition before anything later on that partition,
        is never read after the replay's time released the send (``core.clock.SourceTimes``)."""
        return self._times.common((p for _t, p in self._assigned), self._flushes.complete)

    def _handle(
        self, step: Step, ref: tuple[TP, int] | None, decision: Decision | None = None
    ) -> None:
        if step.retry_after_ms is not None and decision is not None and ref is not None:
            log.info(
                "decision %s is in progress elsewhere; asking again in %d ms",
                decision.decision_id,
                step.retry_after_ms,
            )
            self._later.append((time.monotonic() + step.retry_after_ms / 1000, decision, ref))
            return
        self._publish(step)
        if step.send is None:
            self._done(ref)
            return
        future = self._pool.submit(self._send_job, step.send)
        self._futures[future] = ref  # type: ignore[assignment]

    def _send_job(self, plan: SendPlan) -> Step:
        """In a pool thread: rate limit, last cancel check, gateway call(s), outcome.

        Each Redis step waits out an outage (:meth:`_until_redis`), so no gateway call is made
        while Redis is down, and a call's answer is recorded once it is back."""
        redis_step = self._until_redis
        if self.links is not None:
            links = self.links
            # tracked short links (webhooks serve /l/{code})
            plan = redis_step(lambda: links.apply(plan))
        # receipts: client-ref
        redis_step(lambda: self.store.remember_send(plan.decision, plan.message.segments))
        redis_step(self.limiter.acquire)
        gate = redis_step(lambda: self.policy.begin_call(plan))
        if gate is not None:
            return gate  # type: ignore[no-any-return]
        if not self.event_clock:
            plan = with_send_time(plan, _wall_ms())
        first = [True]

        def acquire() -> None:
            if first[0]:
                first[0] = False  # the first attempt's slot was booked above
            else:
                redis_step(lambda: self.store.extend_call(plan.decision, plan.token))
                redis_step(self.limiter.acquire)

        result = deliver(plan, self._timed_send, self.retry, acquire=acquire)
        at = plan.now_ms if self.event_clock else _wall_ms()
        if not self.event_clock and isinstance(result, SendResult):
            metrics.EVENT_TO_SEND.observe(max(0.0, (at - plan.decision.trigger_ts) / 1000))
        return redis_step(lambda: self.policy.complete(plan, result, at))  # type: ignore[no-any-return]

    def _timed_send(self, message: SmsMessage) -> SendResult:
        """One gateway request, measured (latency histogram, throttling counter)."""
        started = time.perf_counter()
        try:
            return self.gateway.send(message)
        except GatewayError as exc:
            if exc.reason == "throttled":
                metrics.GATEWAY_THROTTLED.inc()
            raise
        finally:
            try:
                self.limiter.done()  # answered (or failed): its rate-limit lease ends now
            except Exception:  # Redis away: the lease then simply runs out (rate_limit.py)
                pass
            metrics.GATEWAY_REQUEST.observe(time.perf_counter() - started)

    def _reap(self, timeout: float) -> None:
        if not self._futures:
            return
        done, _ = wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            ref = self._futures.pop(future)
            try:
                step = future.result()
            except REDIS_DOWN:
                # Given up at shutdown during an outage: not committed, so redelivered.
                log.warning("a send job stopped waiting for redis; its decision is redelivered")
                continue
            except Exception as exc:  # noqa: BLE001 - a bug: stop; redelivery
                log.exception("send job failed; stopping so that the decision is redelivered")
                self.error = exc
                self._stop.set()
                continue
            self._publish(step)
            self._done(ref)

    def _drain(self) -> None:
        while self._futures:
            self._reap(timeout=1.0)
            if self._redis_down_since is not None or self._jobs_wait_for_redis.is_set():
                return  # jobs wait for Redis; what they hold is not committed (redelivered)

    def _drain_all(self) -> None:
        """Every send finished, or an outage (end of input waits for it: markers go last)."""
        self._drain()
        if self._futures:
            raise redis.exceptions.ConnectionError("send jobs are waiting for redis")

    def _done(self, ref: Any) -> None:
        if ref is None:
            return
        tp, offset = ref
        pending = self._pending.get(tp)
        if pending is not None and offset in pending:
            # Handled: every record it produced has a sequence number below this stamp, so the
            # offset may be committed once none of those is undelivered.
            pending[offset] = self._produced + 1

    # ------------------------------------------------------------------ output

    def _publish(self, step: Step) -> None:
        for outcome in step.outcomes:
            self._produce_outcome(outcome)
        if step.dead_letter is not None:
            decision, reason = step.dead_letter
            value = self.codec.encode("TriggerDecision", decision.to_record())
            self._dead_letter(decision.user_id.encode(), value, reason)

    def _produce_outcome(self, outcome: SmsOutcome) -> None:
        value = self.codec.encode("SmsOutcome", outcome.to_record())
        mark = (outcome.user_id, outcome.decision_id, outcome.status)
        self._produce(self.settings.topic_outcomes, outcome.user_id.encode(), value, mark=mark)
        self.stats.outcomes[f"{outcome.status}:{outcome.reason or '-'}"] += 1
        self._count(outcome)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "decision %s (%s): %s%s",
                outcome.decision_id,
                outcome.campaign_id,
                outcome.status,
                f" ({outcome.reason})" if outcome.reason else "",
            )

    def _count(self, outcome: SmsOutcome) -> None:
        """Prometheus counters by outcome (campaign, variant and reason only: never a user)."""
        campaign, reason = outcome.campaign_id, outcome.reason or "none"
        did = outcome.decision_id
        held = did in self._deferred_ids or did in self._released_ids
        if held and outcome.status != "deferred":
            # Deferred here or by another instance and released here: the other instance's
            # +1 and this -1 cancel out in the sum over dispatchers.
            self._deferred_ids.discard(did)
            self._released_ids.discard(did)
            metrics.SMS_DEFERRED.labels(campaign=campaign).dec()
        if outcome.status == "sent":
            metrics.SMS_SENT.labels(
                campaign=campaign, variant=metrics.variant_label(outcome.variant)
            ).inc()
            metrics.SMS_SEGMENTS.labels(campaign=campaign).inc(outcome.segments or 1)
        elif outcome.status in ("suppressed", "failed", "cancelled"):
            # one labelled child per (status, campaign, reason), looked up once
            key = (outcome.status, campaign, reason)
            child = self._by_reason.get(key)
            if child is None:
                metric = _BY_REASON[outcome.status]
                child = self._by_reason[key] = metric.labels(campaign=campaign, reason=reason)
            child.inc()
        elif outcome.status == "deferred" and not held:
            self._deferred_ids.add(did)
            metrics.SMS_DEFERRED.labels(campaign=campaign).inc()

    def _sample_lag(self) -> None:
        if not self.settings.metrics_port or not self._assigned:
            return  # nobody scrapes: skip the broker round trips
        if time.monotonic() - self._last_lag < 5.0:
            return
        self._last_lag = time.monotonic()
        try:
            lags = metrics.confluent_consumer_lag(self.consumer, timeout=2.0)
        except Exception:  # noqa: BLE001 - a metrics sample must never stop sending
            log.debug("consumer lag sample failed", exc_info=True)
            return
        metrics.set_consumer_lag(self.settings.dispatcher_group, lags)

    def _dead_letter(self, key: bytes | None, value: bytes | None, reason: str) -> None:
        self._produce(
            self.settings.topic_sms_dlq, key, value, headers=[(DLQ_REASON_HEADER, reason.encode())]
        )

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        mark: tuple[str, str, str] | None = None,
    ) -> None:
        """Hand a record to the producer; its delivery report (served by ``poll``/``flush``)
        lets the offsets that produced it be committed, and marks a published outcome
        (``mark``) as emitted in Redis at the next commit."""
        self._produced += 1
        seq = self._produced
        undelivered, to_mark, errors = self._undelivered, self._to_mark, self._delivery_errors
        undelivered.add(seq)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            undelivered.discard(seq)
            if err is not None:
                errors.append(err.str())
            elif mark is not None:
                to_mark.append(mark)

        kwargs: dict[str, Any] = {"on_delivery": delivered}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.1)

    # ------------------------------------------------------------------ commits

    def _commit(self, force: bool = False, revoking: bool = False) -> None:
        """Commit each partition up to its first offset that is not handled or whose outcomes
        and dead letters are not all confirmed delivered (delivery reports; ``force``: wait for
        all of them first, e.g. before letting go of partitions)."""
        self.producer.poll(0)  # serves delivery reports
        if not force and time.monotonic() - self._last_commit < self.commit_interval_s:
            return
        self._last_commit = time.monotonic()
        remaining = self.producer.flush(30) if force and self._undelivered else 0
        # The oldest record still undelivered: an offset whose stamp is above it waits.
        oldest = min(self._undelivered, default=self._produced + 1)
        offsets = []
        for (topic, partition), pending in self._pending.items():
            done_upto = None
            for offset in sorted(pending):
                stamp = pending[offset]
                if stamp is False or stamp > oldest:
                    break
                done_upto = offset
            if done_upto is not None:
                offsets.append(TopicPartition(topic, partition, done_upto + 1))
        if remaining or self._delivery_errors:
            errors = list(self._delivery_errors)
            self._delivery_errors.clear()  # in place: delivery callbacks hold these lists
            raise RuntimeError(
                f"could not deliver {remaining} outcome(s) or dead letter(s) "
                f"({'; '.join(errors[:3])}); stopping without committing so the decisions are "
                "redelivered"
            )
        if not offsets and not self._to_mark:
            return
        if self._to_mark:
            try:
                self.store.mark_emitted_many(self._to_mark)
                self._to_mark.clear()
            except REDIS_DOWN:
                if not revoking:
                    raise  # an outage: commit once Redis is back (the marks are kept)
                # Letting go of partitions: the outcomes are out, so commit; marks later.
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # e.g. a rebalance in progress: the outcomes are out; redelivery re-emits nothing.
            log.warning("offset commit failed: %s", exc)
            return
        for tp in offsets:
            pending = self._pending.get((tp.topic, tp.partition), {})
            for offset in [o for o in pending if o < tp.offset]:
                del pending[offset]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish in-flight sends and commit before another instance takes the partitions."""
        try:
            self._drain()
            self._commit(force=True, revoking=True)
        except RuntimeError as exc:
            log.error("%s", exc)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.discard(key)
            self._flushes.seen.pop(tp.partition, None)
            self._flushes.expected.pop(tp.partition, None)
            self._times.forget(tp.partition)
            self._pending.pop(key, None)
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._later = [item for item in self._later if item[2][0] not in gone]
        self._inbox = deque(item for item in self._inbox if item.ref[0] not in gone)
        log.info("revoked partitions %s", sorted(tp.partition for tp in partitions))

    # ------------------------------------------------------------------ end of input

    def _end_of_input(self) -> None:
        """Event clock: every partition is flushed. Release all deferred sends, mark the end."""
        self._drain_all()
        while self._release_due(None):
            self._drain_all()
        self._commit(force=True)
        # Like the worker: for each decisions partition we own (a source), a marker on every
        # outcomes partition, so a reader knows when every source is complete.
        topic = self.settings.topic_outcomes
        meta = self.producer.list_topics(topic, timeout=10).topics[topic]
        decisions = self.settings.topic_decisions
        sources = len(self.producer.list_topics(decisions, timeout=10).topics[decisions].partitions)
        for _t, source in sorted(self._assigned):
            for partition in sorted(meta.partitions):
                self._produce(
                    topic, None, b"", headers=flush_headers(source, sources), partition=partition
                )
        if self.producer.flush(30):
            raise RuntimeError("could not deliver the end-of-input markers")
        self._ended = True
        self.stats.end_of_input += 1
        log.info(
            "end of input: deferred sends released; markers for %d source partition(s) written",
            len(self._assigned),
        )


# ---------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--campaigns", type=Path, help="campaign file (default: NUDGEFLOW_CAMPAIGNS_FILE)"
    )
    parser.add_argument(
        "--rate",
        type=arguments.positive_rate,
        default=DEFAULT_RATE_PER_S,
        help="gateway requests per second, shared by all instances (default 30, Vonage's limit)",
    )
    parser.add_argument("--threads", type=int, default=8, help="gateway call threads")
    parser.add_argument("--max-in-flight", type=int, default=64, help="sends in progress at most")
    parser.add_argument(
        "--retries", type=int, default=5, help="attempts per text on retryable errors"
    )
    parser.add_argument(
        "--retry-base", type=float, default=0.5, help="first retry backoff in seconds"
    )
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="Redis key prefix")


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    logging.basicConfig(
        level=(settings.log_level or "info").upper(),  # NUDGEFLOW_LOG_LEVEL
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        campaigns = load_campaigns(args.campaigns or settings.campaigns_file)
    except CampaignError as exc:
        print(f"nudgeflow dispatcher: {exc}", file=sys.stderr)
        return 2
    try:
        gateway = make_gateway(settings)
    except ValueError as exc:
        print(f"nudgeflow dispatcher: {exc}", file=sys.stderr)
        return 2
    dispatcher = Dispatcher(
        settings,
        campaigns,
        gateway,
        key_prefix=args.key_prefix,
        rate_per_s=args.rate,
        threads=args.threads,
        max_in_flight=args.max_in_flight,
        retry=RetryPolicy(attempts=args.retries, base_s=args.retry_base),
    )

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing in-flight sends and stopping", signum)
        dispatcher.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        metrics.start_metrics_server(settings.metrics_port)  # 0 = off (dev profile default)
    except metrics.MetricsServerError as exc:
        print(f"nudgeflow dispatcher: {exc}", file=sys.stderr)
        return 2
    log.info(
        "dispatcher: group %s, topic %s, gateway %s, clock %s",
        settings.dispatcher_group,
        settings.topic_decisions,
        gateway.name,
        settings.clock,
    )
    dispatcher.run()
    return 1 if dispatcher.error is not None else 0
