"""Faust agents of the trigger worker: a thin shell that moves records in and out of the engine.

All trigger logic is in :class:`processors.core.engine.Engine`; this module only

* decodes clickstream records (bad ones go to the DLQ byte for byte, with a reason header),
* loads/stores each user's engine state in the ``user_state`` table (changelog-backed),
* moves time: flush control records (both clocks) and, with the live clock, ticks,
* encodes decisions and cancellations onto ``sms-decisions`` keyed by user id,
* keeps the worker's Prometheus metrics (:mod:`processors.metrics`) up to date.

Metrics are counted when a record has been handed to the producer, so they agree with what the
topics hold. ``nudgeflow_open_episodes`` is maintained per step from each user's deadlines
(``core["d"]`` of the head state: one entry per campaign with a pending timer); after a rebalance
it is rebuilt in the same table scan that rebuilds the timer index, never per event.

Batches: the clickstream agent takes up to ``BATCH_MAX`` records at a time (waiting at most
``BATCH_WITHIN_S`` for more) and processes them one by one, in order, sending each record's
decisions at once. State writes go to a write-back buffer (``_dirty``, packed table values) that
every read goes through, and the buffer is written to the table once per batch, so a user with
several events in a batch costs one changelog record, not one per event (a Faust table write is
the most expensive thing the worker does, docs/performance.md). Faust acks a batch's records
only after the loop body, so the state is in the table (and its changelog record in the
producer, which Faust flushes before committing) before the offsets can be committed. Unchanged
values are not written at all.

Concurrency: the clickstream agent and the ticks agent run as two asyncio tasks over the same
table. Each user's read-engine-write runs without an ``await`` in between and both read through
the same write-back buffer, so the two never interleave on one user; sends happen after the
state is stored. Delivery is at least once (Faust
flushes the producer before committing offsets): after a crash a few events may be re-applied,
which the engine de-duplicates by ``event_id``, and decision ids are deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.streams import _current_event  # see TriggerShell._flush_dirty
from faust.types import EventT, TopicT

from processors import metrics
from processors.control import flush_headers
from processors.core.campaign import CampaignSet
from processors.core.clock import Clock, SystemClock
from processors.core.decision import Decision
from processors.core.engine import FLUSH_MS, Engine, Step, UserState
from processors.core.events import ClickEvent
from processors.intake import (  # header, reason_tag: re-exported for callers of this module
    EndOfInput,
    Intake,
    Rejected,
    header,  # noqa: F401
    intake,
    reason_tag,  # noqa: F401
)
from processors.settings import Settings
from schemas.codec import Codec
from streams.timers import StoredState, TimerIndex, pack_state, unpack_state
from streams.topics import (
    DLQ_DETAIL_HEADER,
    DLQ_REASON_HEADER,
    Topics,
    make_topics,
)

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.5  # a due timer waits at most this long for its tick (lateness p99 <= 1 s)
LAG_INTERVAL_S = 5.0  # how often every worker samples the consumer lag of its partitions
YIELD_EVERY = 256  # users per flush/tick batch before giving the event loop (heartbeats) a turn
BATCH_MAX = 2000  # clickstream records per batch (stream.take_events)
BATCH_WITHIN_S = 0.01  # longest wait for a batch to fill: bounds the added decision latency
_TICK = struct.Struct(">q")
_REGISTRY_RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Out:
    """One record to produce."""

    topic: TopicT
    kind: str  # "decision" | "cancellation" | "dead_letter"
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] | None = None
    label: str = ""  # metrics: the campaign of a cancellation, the reason of a dead letter
    decision: Decision | None = None  # metrics: the decision a "decision" record carries


@dataclass(slots=True)
class ShellStats:
    """Counters of one worker process (exposed for tests and shutdown logs)."""

    events: int = 0
    decisions: int = 0
    cancellations: int = 0
    duplicates: int = 0
    flushes: int = 0
    ticks: int = 0
    timer_errors: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)


def encode_tick(now_ms: int) -> bytes:
    return _TICK.pack(now_ms)


def decode_tick(value: bytes | None) -> int:
    """Tick value: 8-byte big-endian epoch ms (what we send) or ASCII digits (hand-made ticks)."""
    if value is not None and len(value) == _TICK.size:
        return int(_TICK.unpack(value)[0])
    if value and value.strip().isdigit():
        return int(value)
    raise ValueError("tick value must be 8-byte big-endian or ASCII epoch milliseconds")


class TriggerShell:
    """Owns the table, the timer index and the agents of one Faust app."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        engine: Engine,
        codec: Codec,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine
        self.codec = codec
        self.clock = clock or SystemClock()
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)
        self.topics: Topics = make_topics(app, settings)
        self.table = app.Table(
            "user_state",
            partitions=settings.partitions,
            key_type=bytes,  # bytes -> Faust's raw serializer (see streams.app)
            value_type=bytes,
            help="engine state per user: streams.timers.pack_state(partition, wake_at, state)",
        )
        self.timers = TimerIndex(self._scan_table)
        # Write-back buffer: user key -> (packed value or None = delete, the record that wrote it)
        self._dirty: dict[bytes, tuple[bytes | None, EventT]] = {}
        self.stats = ShellStats()
        self.live = settings.clock == "live"
        self.vocabulary = frozenset(engine.by_type)  # event types some enabled campaign reads
        self.campaign_ids = frozenset(engine.index)
        for campaign_id in self.campaign_ids:
            metrics.CAMPAIGN_ENABLED.labels(campaign_id).set(1)
        self.episodes = metrics.PartitionedGauge(metrics.OPEN_EPISODES, self.campaign_ids)
        app.agent(self.topics.clickstream, name="nudgeflow.clickstream")(self._clickstream_agent)
        if settings.clock == "live":
            app.agent(self.topics.ticks, name="nudgeflow.ticks")(self._ticks_agent)
            app.timer(TICK_INTERVAL_S, on_leader=True, name="nudgeflow.send_ticks")(
                self._send_ticks
            )
        app.timer(LAG_INTERVAL_S, name="nudgeflow.consumer_lag")(self.sample_lag)
        app.on_partitions_revoked.connect(self._on_rebalance)
        app.on_partitions_assigned.connect(self._on_rebalance)

    # ------------------------------------------------------------------ agents

    async def _clickstream_agent(self, stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            try:
                for event in events:
                    await self._on_record(event)
            finally:
                self._flush_dirty()  # before Faust acks the batch (module docstring)

    async def _on_record(self, event: EventT) -> None:
        msg = event.message
        key, value = event.key, event.value
        got = await self._intake(key, value, msg.headers)
        if isinstance(got, EndOfInput):
            await self.flush_partition(msg.partition, event)
            return
        if isinstance(got, Rejected) and got.control:
            await self._send([self._dead(key, value, got.reason, got.detail, msg)])
            return
        self.stats.events += 1
        click = got.event if isinstance(got, Rejected) else got
        label = metrics.OTHER
        if click is not None:
            label = metrics.event_type_label(click.event_type, self.vocabulary)
        metrics.EVENTS_CONSUMED.labels(label).inc()
        if isinstance(got, Rejected):
            await self._send([self._dead(key, value, got.reason, got.detail, msg)])
            return
        await self._send(self._on_click(got, key, value, event))

    async def _ticks_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            partition = event.message.partition
            try:
                now_ms = decode_tick(event.value)
            except ValueError:
                log.warning("ignoring a malformed tick on partition %d", partition)
                continue
            self.stats.ticks += 1
            try:
                await self.advance_partition(partition, now_ms - self.lateness_ms, event)
            finally:
                self._flush_dirty()

    async def _send_ticks(self) -> None:
        """Leader only: one tick per partition of the ticks topic (co-partitioned)."""
        value = encode_tick(self.clock.now_ms())
        for partition in range(self.settings.partitions):
            await self.topics.ticks.send(
                key=str(partition).encode(), value=value, partition=partition
            )

    def _on_rebalance(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        self.timers.clear()
        self.episodes.clear()  # rebuilt with the timer index, once the table is recovered

    async def sample_lag(self) -> None:
        """Every worker: lag of its clickstream/ticks partitions -> ``nudgeflow_consumer_lag``.

        Log end offsets come from the broker; the committed offsets from Faust's consumer (it
        keeps no public view of them: ``_committed_offset`` holds the broker's committed offset
        at assignment and every commit since; None = nothing committed, or offset 0).
        """
        sources = {self.settings.topic_clickstream, self.settings.topic_ticks}
        consumer = self.app.consumer
        try:
            tps = [tp for tp in consumer.assignment() if tp.topic in sources]
            ends = await consumer.highwaters(*tps) if tps else {}
            starts = await consumer.earliest_offsets(*tps) if tps else {}
        except Exception as exc:  # mid-rebalance or broker away: try again next interval
            log.debug("consumer lag not sampled: %s: %s", type(exc).__name__, exc)
            return
        committed = getattr(consumer, "_committed_offset", {})
        lags: dict[tuple[str, int], int] = {}
        for tp in tps:
            end = ends.get(tp)
            if end is None:
                continue
            start = starts.get(tp) or 0
            lags[(tp.topic, tp.partition)] = end - max(committed.get(tp) or 0, start)
        metrics.set_consumer_lag(self.app.conf.id, lags)

    # ------------------------------------------------------------------ time

    async def flush_partition(self, partition: int, event: EventT) -> None:
        """End of input on ``partition`` (``event`` is the flush record): commit every pending
        timer of its users."""
        self.stats.flushes += 1
        users = self.timers.partition(partition).all_users()
        await self._advance_users(partition, users, FLUSH_MS, event)
        # Forward end of input to every send-topic partition, after this partition's decisions.
        headers = dict(flush_headers(partition, self.settings.partitions))
        for target in range(self.settings.partitions):
            await self.topics.decisions.send(value=b"", partition=target, headers=headers)

    async def advance_partition(self, partition: int, watermark_ms: int, event: EventT) -> None:
        """Move time to ``watermark_ms`` for the users of ``partition`` that are due (``event``
        is the tick, co-partitioned with the clickstream)."""
        users = self.timers.partition(partition).pop_due(watermark_ms)
        await self._advance_users(partition, users, watermark_ms, event)

    async def _advance_users(
        self, partition: int, users: list[str], watermark_ms: int, event: EventT
    ) -> None:
        for i, user_id in enumerate(users, 1):
            await self._send(self._on_time(user_id, partition, watermark_ms, event))
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    # ------------------------------------------------------------------ synchronous core calls

    def _on_click(
        self, click: ClickEvent, key: bytes | None, value: bytes, event: EventT
    ) -> list[Out]:
        msg = event.message
        user_key = click.user_id.encode()  # == key: processors.intake checked it
        try:
            raw = self._load_raw(user_key)
            state = self._decode(raw)
            before = self._open_campaigns(state)  # the engine changes ``state`` in place
            step = self.engine.on_event(state, click)
            out = self._outputs(step, current=(click, key, value, msg))
            unchanged = state is not None and any(ev is click for ev, _ in step.rejected)
            if not unchanged:
                self._store(user_key, click.user_id, msg.partition, step, event, raw)
                self.episodes.change(msg.partition, before, self._open_campaigns(step.state))
        except Exception as exc:  # an engine/state bug must not stop the partition
            log.exception(
                "engine failed on event %s (partition %d offset %d)",
                click.event_id,
                msg.partition,
                msg.offset,
            )
            return [self._dead(key, value, "internal_error", type(exc).__name__, msg)]
        return out

    def _on_time(self, user_id: str, partition: int, watermark_ms: int, event: EventT) -> list[Out]:
        timers = self.timers.partition(partition)
        timers.discard(user_id)
        user_key = user_id.encode()
        try:
            raw = self._load_raw(user_key)
            state = self._decode(raw)
            if state is None:
                return []
            before = self._open_campaigns(state)
            step = self.engine.on_time(state, watermark_ms)
            out = self._outputs(step, current=None)
            self._store(user_key, user_id, partition, step, event, raw)
            self.episodes.change(partition, before, self._open_campaigns(step.state))
        except Exception:
            # The timer is dropped (the user's next event re-arms it); the state is untouched.
            self.stats.timer_errors += 1
            log.exception("engine.on_time failed for a user of partition %d", partition)
            return []
        return out

    def _load_raw(self, user_key: bytes) -> bytes | None:
        """The user's packed table value: the write-back buffer first, then the table."""
        pending = self._dirty.get(user_key)
        if pending is not None:
            return pending[0]
        return self.table.get(user_key)

    @staticmethod
    def _decode(raw: bytes | None) -> UserState | None:
        return None if raw is None else UserState.from_bytes(unpack_state(raw).state)

    def _store(
        self,
        user_key: bytes,
        user_id: str,
        partition: int,
        step: Step,
        event: EventT,
        previous: bytes | None,
    ) -> None:
        """Buffer the new value (None = delete) with the record that caused it; skip it when it
        equals ``previous``, the value the step started from."""
        timers = self.timers.partition(partition)  # build the index before changing the table
        if step.state is None:
            if previous is not None:
                self._dirty[user_key] = (None, event)
            timers.discard(user_id)
            return
        value = pack_state(partition, step.wake_at, step.state.to_bytes())
        if value != previous:
            self._dirty[user_key] = (value, event)
        timers.set(user_id, step.wake_at)

    def _flush_dirty(self) -> None:
        """Write the buffered values to the table (one changelog record per user).

        Synchronous, so no other task sees a half-written buffer. Faust sends each changelog
        record to the partition of the *current event*, and its RocksDB store picks the
        partition's database the same way; inside ``take_events`` that context belongs to
        Faust's background drainer, not to this task, so each write runs with the record that
        produced it set as the current event.
        """
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        table = self.table
        for user_key, (value, event) in dirty.items():
            token = _current_event.set(weakref.ref(event))
            try:
                if value is not None:
                    table[user_key] = value
                elif user_key in table:
                    del table[user_key]
            finally:
                _current_event.reset(token)

    def _open_campaigns(self, state: UserState | None) -> frozenset[str]:
        """Campaigns with a pending timer (open episodes) in the user's head state: committed
        plus the tail, so a cart shows as open as soon as its event is applied, not only once
        the watermark has committed it."""
        if state is None:
            return frozenset()
        core = state.head if state.head is not None else state.committed
        deadlines = core.get("d")
        if not deadlines:
            return frozenset()
        return self.campaign_ids.intersection(deadlines)

    def _scan_table(self) -> list[tuple[str, StoredState]]:
        """The timer index's rebuild scan; also recounts the open episodes (only users with a
        pending wake-up can have one, so only their states are decoded)."""
        entries: list[tuple[str, StoredState]] = []
        counts: dict[int, Counter[str]] = {}
        values: dict[bytes, bytes | None] = dict(self.table.items())
        values.update((k, v) for k, (v, _event) in self._dirty.items())  # not yet written
        for key, value in values.items():
            if value is None:
                continue
            try:
                stored = unpack_state(value)
                entries.append((key.decode(), stored))
            except (ValueError, AttributeError):
                log.error("skipping an unreadable user_state entry while rebuilding timers")
                continue
            if stored.wake_at is None:
                continue
            try:
                open_now = self._open_campaigns(UserState.from_bytes(stored.state))
            except (ValueError, TypeError):
                continue  # counted in no campaign; the timer itself still works
            if open_now:
                counts.setdefault(stored.partition, Counter()).update(open_now)
        self.episodes.reset(counts, self._owned_partitions(counts))
        return entries

    def _owned_partitions(self, fallback: dict[int, Counter[str]]) -> set[int]:
        """Clickstream partitions assigned to this worker (the table may hold others' keys)."""
        try:
            assigned = self.app.consumer.assignment()
        except Exception:  # no consumer (unit use): every partition seen counts
            return set(fallback)
        topic = self.settings.topic_clickstream
        return {tp.partition for tp in assigned if tp.topic == topic}

    def _outputs(
        self, step: Step, current: tuple[ClickEvent, bytes | None, bytes, Any] | None
    ) -> list[Out]:
        """Encode everything ``step`` produced (before the state is stored: an encoding error
        leaves the state as it was)."""
        out: list[Out] = []
        decisions = self.topics.decisions
        for d in step.decisions:
            value = self.codec.encode("TriggerDecision", d.to_record())
            out.append(Out(decisions, "decision", d.user_id.encode(), value, decision=d))
        for c in step.cancellations:
            value = self.codec.encode("DecisionCancelled", c.to_record())
            out.append(
                Out(decisions, "cancellation", c.user_id.encode(), value, label=c.campaign_id)
            )
        for ev, reason in step.rejected:
            if reason == "duplicate":
                self.stats.duplicates += 1
                continue
            detail = f"the engine rejected the event as {reason}"
            if reason == "late":
                detail = (
                    f"event time is before the user's watermark "
                    f"(allowed lateness {self.settings.allowed_lateness_s:g}s)"
                )
            if current is not None and ev is current[0]:
                out.append(self._dead(current[1], current[2], reason, detail, current[3]))
            else:
                raw = self.codec.encode("ClickEvent", ev.to_record())
                out.append(self._dead(ev.user_id.encode(), raw, reason, detail, None))
        return out

    def _dead(
        self, key: bytes | None, value: bytes | None, reason: str, detail: str, msg: Any
    ) -> Out:
        count = self.stats.dead_letters[reason] = self.stats.dead_letters[reason] + 1
        if count <= 10 or count % 1000 == 0:  # no flood of logs on a bad replay
            where = f" (partition {msg.partition} offset {msg.offset})" if msg is not None else ""
            log.warning("dead-lettering a clickstream record: %s%s [#%d]", reason, where, count)
        headers = {DLQ_REASON_HEADER: reason.encode(), DLQ_DETAIL_HEADER: detail[:500].encode()}
        return Out(self.topics.clickstream_dlq, "dead_letter", key, value or b"", headers, reason)

    # ------------------------------------------------------------------ I/O

    async def _intake(self, key: bytes | None, value: bytes | None, headers: Any) -> Intake:
        """:func:`processors.intake.intake`; bad data comes back as ``Rejected``, so whatever it
        raises is a registry outage: retried, never dead-lettered."""
        delay = 0.5
        while True:
            try:
                return intake(self.codec, key, value, headers)
            except Exception as exc:
                log.error(
                    "schema registry error (%s); retrying in %.1fs", type(exc).__name__, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REGISTRY_RETRY_MAX_S)

    async def _send(self, out: list[Out]) -> None:
        for o in out:
            await o.topic.send(key=o.key, value=o.value, headers=o.headers)
            if o.kind == "decision":
                self.stats.decisions += 1
                if o.decision is not None:
                    d = o.decision
                    metrics.record_decision(
                        d.campaign_id,
                        d.variant,
                        trigger_ts_ms=d.trigger_ts,
                        fire_at_ms=d.fire_at,
                        now_ms=self.clock.now_ms(),
                        live=self.live,
                        allowed_lateness_ms=self.lateness_ms,
                    )
            elif o.kind == "cancellation":
                self.stats.cancellations += 1
                metrics.DECISIONS_CANCELLED.labels(o.label).inc()
            elif o.kind == "dead_letter":
                metrics.EVENTS_DEAD_LETTERED.labels(o.label).inc()


def install(
    app: faust.App, settings: Settings, campaigns: CampaignSet, *, codec: Codec | None = None
) -> TriggerShell:
    """Build the engine for ``settings.clock`` and register the agents on ``app``."""
    live = settings.clock == "live"
    engine = Engine(
        campaigns,
        allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
        clock=SystemClock() if live else None,  # decided_at: wall clock live, unset in replays
        clock_name=settings.clock,
    )
    return TriggerShell(app, settings, engine, codec or Codec(settings.schema_registry_url))
