"""``nudgeflow attribution``: conversions attributed to texts, live, onto ``sms-conversions``.

The shell around :mod:`processors.core.attribution`: a confluent-kafka consumer group on
``sms-outcomes`` (sent texts and held-out decisions are touches) and ``clickstream``
(``sms_link_click`` events are clicks; events of a campaign's conversion types are
conversions), with each user's state in Redis (shared by every instance, so the two topics need
not be co-partitioned).

A conversion event waits ``--settle`` seconds (event time + delay, against the wall clock) before
it is attributed, so the outcome of a text sent just before a purchase is in even when the
outcomes topic lags the clickstream. With ``NUDGEFLOW_CLOCK=event`` (replays) conversions are
attributed when end-of-input markers have been seen on every assigned partition of both topics.

Keys: ``Pattr:u:<user>`` the user's state (JSON), ``Pattr:due`` the users by when their next
pending conversion is due. On a Redis Cluster (``redis+cluster://``) both are split into
``ATTR_SHARDS`` shards that keep a user's state and its due entry in one slot
(``Pattr:{a<k>}:u:<user>``, ``Pattr:{a<k>}:due``, ``k`` = CRC32 of the user id modulo the
shards), so one WATCH/MULTI transaction still updates both.

Delivery: at least once, with deterministic ``conversion_id`` s. A settled conversion is kept in
the user's state as *unsent* until it has been produced and flushed; offsets are committed after
that. A crash in between re-produces it with the same id.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from processors.core.attribution import (
    AttributionError,
    Click,
    Conversion,
    Rules,
    Touch,
    UserState,
)
from processors.core.campaign import CampaignError, CampaignSet, load_campaigns
from processors.core.clock import SystemClock
from processors.core.events import ClickEvent, EventError
from processors.core.outcome import OutcomeError, SmsOutcome
from processors.kafka.control import FlushTracker, is_control
from processors.redis import DEFAULT_PREFIX
from processors.redis.client import Client, connect, is_cluster
from processors.settings import Settings
from schemas.codec import Codec, CodecError

log = logging.getLogger("nudgeflow.attribution")

DEFAULT_GROUP = "nudgeflow-attribution"
DEFAULT_SETTLE_S = 30.0
DEFAULT_LINK_LIFETIME_MS = 30 * 86_400_000  # a click can come this long after the text
ATTR_SHARDS = 16
"""Shards of the users' state on a Redis Cluster. Fixed for a deployment: users of a shard a
smaller count no longer names are not swept."""
_WALL = SystemClock()


@dataclass
class Stats:
    """Log-safe counts (no ids)."""

    touches: int = 0
    clicks: int = 0
    conversion_events: int = 0
    conversions: Counter[str] = field(default_factory=Counter)  # "send"/"click"/"holdout"
    unattributed: int = 0
    bad_values: int = 0
    undecodable: int = 0
    bad_state: int = 0


@dataclass
class _Batch:
    touches: list[Touch] = field(default_factory=list)
    clicks: list[Click] = field(default_factory=list)
    conversions: list[ClickEvent] = field(default_factory=list)


class Attributor:
    """One instance of the attribution service; ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        campaigns: CampaignSet,
        *,
        redis_client: Client | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        group_id: str = DEFAULT_GROUP,
        settle_s: float = DEFAULT_SETTLE_S,
        clock: Callable[[], int] = _WALL.now_ms,
    ) -> None:
        self.settings = settings
        self.rules = Rules(campaigns)
        self.event_clock = settings.clock == "event"
        self.settle_ms = int(settle_s * 1000)
        self.clock = clock
        self.codec = Codec(settings.schema_registry_url)
        self.redis = redis_client or connect(settings.redis_url)
        self.prefix = f"{key_prefix}attr:"
        if is_cluster(self.redis):
            self._shards = [f"{self.prefix}{{a{k}}}:" for k in range(ATTR_SHARDS)]
        else:
            self._shards = [self.prefix]
        # user id -> when its next pending event is due (one index per shard)
        self.due_keys = [f"{shard}due" for shard in self._shards]
        link_ms = int(getattr(settings, "link_ttl_s", DEFAULT_LINK_LIFETIME_MS / 1000) * 1000)
        self.touch_keep_ms = max(
            self.rules.max_after_send_ms, link_ms + self.rules.max_after_click_ms
        )
        self.stats = Stats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._topics = (settings.topic_outcomes, settings.topic_clickstream)
        self._assigned: set[tuple[str, int]] = set()
        self._flushes = {t: FlushTracker() for t in self._topics}
        self._ended = False
        self._max_event_ms = 0  # event clock: the replay's time
        self._last_sweep = 0.0
        self.consumer = Consumer(settings.consumer_conf(group_id))
        self.producer = Producer(
            {**settings.kafka_common(), "enable.idempotence": True, "linger.ms": 5}
        )

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        try:
            self.consumer.subscribe(
                list(self._topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            if ready is not None:
                ready()
            while not self._stop.is_set():
                self.step()
        except BaseException as exc:
            self.error = exc
            log.exception("attribution stopped on an error")
            raise
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.producer.flush(10)
        finally:
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError):
                pass
            log.info(
                "attribution stopped: %d touches, %d clicks, %d conversion events, "
                "conversions %s, %d unattributed",
                self.stats.touches,
                self.stats.clicks,
                self.stats.conversion_events,
                dict(self.stats.conversions),
                self.stats.unattributed,
            )

    def _on_assign(self, _consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in parts}
        for topic, tracker in self._flushes.items():
            tracker.partitions = {p for t, p in self._assigned if t == topic}

    def _on_revoke(self, _consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._assigned -= {(tp.topic, tp.partition) for tp in parts}
        for topic, tracker in self._flushes.items():
            tracker.partitions = {p for t, p in self._assigned if t == topic}

    # ------------------------------------------------------------------ one poll

    def step(self, timeout_s: float = 0.5) -> None:
        """Consume a batch, update user states, produce settled conversions, commit."""
        msgs = self.consumer.consume(500, timeout=timeout_s)
        batch: dict[str, _Batch] = defaultdict(_Batch)
        for msg in msgs:
            if msg.error() is not None:
                continue
            self._read(msg, batch)
        # event clock: nothing is attributed before the end of input (outcomes may lag behind)
        settle = not self.event_clock or self._ended
        now = self._now()
        produced: list[tuple[str, list[Conversion]]] = []
        for user, b in batch.items():
            produced.append((user, self._update(user, b, now if settle else -1)))
        if self._end_of_input():
            while swept := self._sweep(None):
                self._publish(swept)
        elif settle and time.monotonic() - self._last_sweep >= 1.0:
            self._last_sweep = time.monotonic()
            produced += self._sweep(now)
        self._publish(produced)
        if msgs:
            try:
                self.consumer.commit(asynchronous=False)
            except KafkaException as exc:  # e.g. a rebalance took the partitions: redelivered
                log.warning("offset commit failed: %s", exc.args[0])

    def _now(self) -> int:
        return self._max_event_ms if self.event_clock else self.clock()

    def _end_of_input(self) -> bool:
        if not self.event_clock or self._ended:
            return False
        if all(t.all_complete() for t in self._flushes.values()):
            self._ended = True
            log.info("end of input on every assigned partition: settling all conversions")
            return True
        return False

    def _read(self, msg: Message, batch: dict[str, _Batch]) -> None:
        topic = msg.topic() or ""
        raw = msg.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
        if is_control(headers):
            self._flushes[topic].observe(msg.partition() or 0, headers)
            return
        try:
            name, rec = self.codec.decode(msg.value())
            if name == "SmsOutcome":
                touch = Touch.from_outcome(SmsOutcome.from_record(rec))
                if touch is not None:
                    batch[touch.user_id].touches.append(touch)
                    self._max_event_ms = max(self._max_event_ms, touch.at)
            elif name == "ClickEvent":
                event = ClickEvent.from_record(rec)
                self._max_event_ms = max(self._max_event_ms, event.ts)
                click = Click.from_event(event)
                if click is not None:
                    batch[event.user_id].clicks.append(click)
                elif event.event_type in self.rules.conversion_types:
                    batch[event.user_id].conversions.append(event)
        except (CodecError, EventError, OutcomeError, KeyError, TypeError, ValueError) as exc:
            # bad records are the producers' to dead-letter; here they count and are skipped
            self.stats.undecodable += 1
            log.warning("skipped an unreadable record on %s: %s", topic, type(exc).__name__)

    # ------------------------------------------------------------------ Redis state

    def _shard(self, user: str) -> str:
        shards = self._shards
        if len(shards) == 1:
            return shards[0]
        return shards[zlib.crc32(user.encode()) % len(shards)]

    def state_key(self, user: str) -> str:
        """The key of ``user``'s state (its due entry is in ``due_key(user)``, same slot)."""
        return f"{self._shard(user)}u:{user}"

    def due_key(self, user: str) -> str:
        return f"{self._shard(user)}due"

    def _transact(self, user: str, change: Callable[[UserState], None]) -> list[Conversion]:
        """Load, change and store one user's state atomically (WATCH/MULTI, retried)."""
        key, due_key = self.state_key(user), self.due_key(user)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    state = UserState()
                    if raw is not None:
                        try:
                            state = UserState.from_json(json.loads(raw))
                        except (AttributionError, json.JSONDecodeError, UnicodeDecodeError):
                            self.stats.bad_state += 1
                            log.error("attribution state of a user is malformed; starting over")
                    change(state)
                    pipe.multi()
                    if state.empty:
                        pipe.delete(key)
                    else:
                        pipe.set(key, json.dumps(state.to_json(), separators=(",", ":")),
                                 px=self.touch_keep_ms + 86_400_000)  # fmt: skip
                    due = 0 if state.unsent else state.next_due()
                    if due is None:
                        pipe.zrem(due_key, user)
                    else:
                        pipe.zadd(due_key, {user: due})
                    pipe.execute()
                    return list(state.unsent)
                except redis.WatchError:
                    continue

    def _update(self, user: str, b: _Batch, now: int) -> list[Conversion]:
        arrival = self._now()

        def change(state: UserState) -> None:
            for t in b.touches:
                self.stats.touches += state.add_touch(t)
            for c in b.clicks:
                self.stats.clicks += state.add_click(c)
            for e in b.conversions:
                # due: settle delay after it reached us (or after its time, if in the future)
                due = max(e.ts, arrival) + self.settle_ms
                self.stats.conversion_events += state.add_conversion_event(e, due)
            self._settle(state, now)

        return self._transact(user, change)

    def _settle(self, state: UserState, now: int | None) -> None:
        """Attribute what is due at ``now`` (None: everything; negative: nothing yet)."""
        if now is not None and now < 0:
            return
        pending = len(state.pending)
        conversions, bad = state.settle(now, self.rules)
        self.stats.bad_values += bad
        self.stats.unattributed += pending - len(state.pending) - len(conversions)
        for c in conversions:
            self.stats.conversions["holdout" if c.holdout else c.via] += 1
        state.prune(now if now is not None else self._max_event_ms, self.touch_keep_ms, self.rules)

    def _sweep(self, now: int | None) -> list[tuple[str, list[Conversion]]]:
        """Users whose pending conversions are due (all of them at end of input), at most 1000
        of each shard."""
        limit = "+inf" if now is None else now
        out = []
        for due_key in self.due_keys:
            for raw in self.redis.zrangebyscore(due_key, "-inf", limit, start=0, num=1000):
                user = raw.decode() if isinstance(raw, bytes) else str(raw)
                out.append((user, self._transact(user, lambda s: self._settle(s, now))))
        return out

    def _publish(self, produced: list[tuple[str, list[Conversion]]]) -> None:
        """Produce and flush, then drop the conversions from the users' unsent lists."""
        todo = [(u, cs) for u, cs in produced if cs]
        if not todo:
            return
        errors: list[str] = []

        def on_delivery(err: object, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        topic = self.settings.topic_conversions
        for user, conversions in todo:
            for c in conversions:
                self.producer.produce(
                    topic,
                    key=user.encode(),
                    value=self.codec.encode("Conversion", c.to_record()),
                    on_delivery=on_delivery,
                )
        remaining = self.producer.flush(30)
        if remaining or errors:
            raise RuntimeError(
                f"could not produce conversions ({remaining} pending, errors: {errors[:3]})"
            )
        for user, conversions in todo:
            ids = {c.conversion_id for c in conversions}
            self._transact(user, lambda s, ids=ids: s.mark_produced(ids))  # type: ignore[misc]


# ---------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--campaigns", type=Path, help="campaign file (default: NUDGEFLOW_CAMPAIGNS_FILE)"
    )
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group id")
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE_S,
        help="seconds a conversion waits for late outcomes before it is attributed",
    )
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="Redis key prefix")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings.load()
    try:
        campaigns = load_campaigns(args.campaigns or settings.campaigns_file)
    except CampaignError as exc:
        print(f"nudgeflow attribution: {exc}", file=sys.stderr)
        return 2
    service = Attributor(
        settings, campaigns, key_prefix=args.key_prefix, group_id=args.group, settle_s=args.settle
    )

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "attribution: topics %s -> %s, clock %s",
        ", ".join(service._topics),
        settings.topic_conversions,
        settings.clock,
    )
    try:
        service.run()
    except Exception:
        return 1
    return 0
