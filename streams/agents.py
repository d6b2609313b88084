"""The trigger worker's shell: moves records in and out of the engine.

All trigger logic is in :class:`processors.core.engine.Engine`; this module only

* reads the clickstream in batches (:mod:`streams.clickstream`, a confluent-kafka consumer that
  follows Faust's assignment) and decodes it (bad records go to the DLQ byte for byte, with a
  reason header),
* keeps each user's engine state in the ``user_state`` table through a write-back buffer and
  checkpoints (:mod:`streams.checkpoint`: states and clickstream positions written together to
  the table's changelog),
* moves time: flush control records (both clocks) and, with the live clock, ticks (a Faust agent
  on the co-partitioned ticks topic),
* produces decisions and cancellations onto ``sms-decisions`` keyed by user id
  (:mod:`streams.output`),
* keeps the worker's Prometheus metrics (:mod:`processors.metrics`) up to date.

Faust provides group membership and partition assignment (the ticks topic), the table and its
changelog recovery, the ticks and the web server; the per-record path is ours because Faust's
costs ~200 us per record (docs/performance.md).

Concurrency: the read loop and the ticks agent are two asyncio tasks over the same state; each
holds :attr:`TriggerShell.busy` while it touches state, so they never interleave, and a
rebalance takes it too before it checkpoints and lets partitions go.

Delivery is at least once: after a crash the worker resumes each partition at its last
checkpoint, so a few events may be applied again, which the engine de-duplicates by
``event_id``; decision ids are deterministic, so the dispatcher sends each at most once.
``nudgeflow_open_episodes`` is maintained per step from each user's deadlines (``core["d"]``);
after a rebalance it is rebuilt in the table scan that rebuilds the timer index.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import faust
from confluent_kafka import Message

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
from streams.checkpoint import Checkpointer, is_position_key
from streams.clickstream import ClickstreamReader, offsets_group
from streams.output import Output
from streams.state_cache import LiveState, StateCache
from streams.timers import StoredState, TimerIndex, unpack_state
from streams.topics import (
    DLQ_DETAIL_HEADER,
    DLQ_REASON_HEADER,
    Topics,
    make_topics,
)

log = logging.getLogger(__name__)
STATUS_LOGGER = "nudgeflow.worker"
status = logging.getLogger(STATUS_LOGGER)
"""The worker's few status lines (start, assignment changes): shown at the default log level
by ``nudgeflow worker``; never a user id, number or text, never one per event."""

TICK_INTERVAL_S = 0.5  # a due timer waits at most this long for its tick (lateness p99 <= 1 s)
LAG_INTERVAL_S = 5.0  # how often every worker samples the consumer lag of its partitions
RECONCILE_INTERVAL_S = 2.0  # how often the read partitions are checked against Faust's
RECONCILE_AFTER_S = 6.0  # a mismatch this long outside a rebalance is not a rebalance in flight
YIELD_EVERY = 1000  # records/users between turns given to the event loop (heartbeats)
CHECKPOINT_S = 0.5  # longest time a state change stays only in memory
REVOKE_CHECKPOINT_S = 30.0  # longest a rebalance waits for the worker's last checkpoint
EXIT_CHECKPOINT_FAILED = 75  # EX_TEMPFAIL: a supervisor restarts the worker
CHECKPOINT_MAX_PENDING = 20_000  # live states (~6 KB each) buffered before a forced checkpoint
GC_THRESHOLDS = (20_000, 20, 20)  # the engine makes many short-lived dicts: fewer gen-0 passes
_TICK = struct.Struct(">q")
_NONE_OPEN: frozenset[str] = frozenset()
_REGISTRY_RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Out:
    """One record to produce."""

    topic: str
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


class _Where:
    """Partition and offset of a clickstream record, for log lines."""

    __slots__ = ("partition", "offset")

    def __init__(self, partition: int, offset: int) -> None:
        self.partition = partition
        self.offset = offset


class TriggerShell:
    """Owns the table, the timer index, the clickstream reader and the agents of one Faust app."""

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
        self.live = settings.clock == "live"
        # Event clock: only the end-of-input flush reads the index (all its users), no ticks.
        self.timers = TimerIndex(self._scan_table, ordered=self.live)
        self.states = StateCache(settings.state_cache_users)  # streams.state_cache
        self.stats = ShellStats()
        self.vocabulary = engine.event_types  # event types some enabled campaign reads
        self.campaign_ids = engine.campaign_ids
        for campaign_id in self.campaign_ids:
            metrics.CAMPAIGN_ENABLED.labels(campaign_id).set(1)
        self.episodes = metrics.PartitionedGauge(metrics.OPEN_EPISODES, self.campaign_ids)
        self.busy = asyncio.Lock()
        self._output: Output | None = None
        self._reader: ClickstreamReader | None = None
        self._checkpointer: Checkpointer | None = None
        self._last_checkpoint = time.monotonic()
        self._writer: asyncio.Future[None] | None = None
        self._running = False
        self._reading: asyncio.Task[None] | None = None
        # Ticks: a Faust agent in both clocks (the ticks topic carries the assignment); the
        # event clock ignores tick values.
        app.agent(self.topics.ticks, name="nudgeflow.ticks")(self._ticks_agent)
        if self.live:
            app.timer(TICK_INTERVAL_S, on_leader=True, name="nudgeflow.send_ticks")(
                self._send_ticks
            )
        app.timer(LAG_INTERVAL_S, name="nudgeflow.consumer_lag")(self.sample_lag)
        app.timer(RECONCILE_INTERVAL_S, name="nudgeflow.reconcile")(self._reconcile)
        self._mismatch_since: float | None = None
        self._announced: frozenset[int] | None = None  # partitions last reported as assigned
        self.tick_watermarks: dict[int, int] = {}  # live clock: partition -> last tick watermark
        app.task(self._read_loop)
        app.on_rebalance_complete.connect(self._on_rebalance_complete)  # type: ignore[arg-type]
        hooks = getattr(app, "nudgeflow_hooks", None)
        if hooks is not None:  # streams.app.WorkerApp: run before Faust's own revoke/stop
            hooks.before_revoke.append(self._before_revoke)
            hooks.before_stop.append(self._before_stop)
        else:
            app.on_partitions_revoked.connect(self._on_revoked_signal)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ parts made at start

    @property
    def output(self) -> Output:
        if self._output is None:
            self._output = Output(self.settings, client_id=f"{self.settings.worker_id}-out")
        return self._output

    @property
    def reader(self) -> ClickstreamReader:
        if self._reader is None:
            self._reader = ClickstreamReader(
                self.settings, client_id=f"{self.settings.worker_id}-clickstream"
            )
        return self._reader

    @property
    def checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(
                self.table.data, self.output, self.table.changelog_topic.get_topic_name()
            )
        return self._checkpointer

    # ------------------------------------------------------------------ rebalances

    async def _on_rebalance_complete(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        """Tables recovered: read the clickstream partitions that go with our ticks partitions,
        each from the position stored in the table."""
        async with self.busy:
            try:
                assigned = self.app.consumer.assignment()
            except Exception:
                return
            ticks = self.settings.topic_ticks
            mine = {tp.partition for tp in assigned if tp.topic == ticks}
            reader = self.reader
            gone = reader.owned - mine
            if gone:  # missed a revoke (should not happen): nothing of theirs is written
                reader.release_all()
                self.checkpointer.drop(gone)
            new = mine - reader.owned
            positions = {p: self.checkpointer.position(p) for p in sorted(new)}
            self.timers.clear()
            self.states.clear()
            self.episodes.clear()
            reader.assign(positions)
            for p, off in positions.items():
                log.info("clickstream partition %d resumes at %s", p, off or "the beginning")
            if mine != self._announced:  # one line per change (an eager rebalance gives back)
                self._announced = frozenset(mine)
                status.info("assigned partitions %s", sorted(mine))

    async def _before_revoke(self, revoked: Any = None) -> None:
        """Faust is about to give partitions away: write everything, then let go of them all
        (Faust's eager rebalance revokes every partition; the complete handler takes back what
        stays ours, at the position just written)."""
        async with self.busy:
            if self._checkpointer is not None:
                try:
                    await asyncio.wait_for(self._checkpoint_now(), REVOKE_CHECKPOINT_S)
                except Exception as exc:
                    # Letting the partitions go with a checkpoint that may still land later
                    # could put stale states after the next owner's: stop instead (the
                    # restart resumes from the last position written).
                    log.critical(
                        "last checkpoint before a rebalance failed (%s); the worker exits",
                        type(exc).__name__,
                    )
                    os._exit(EXIT_CHECKPOINT_FAILED)
            if self._reader is not None:
                self.reader.release_all()
            self.timers.clear()
            self.states.clear()
            self.episodes.clear()

    async def _reconcile(self) -> None:
        """Safety net: the clickstream partitions read must be the ticks partitions Faust gave
        this worker. If they differ for :data:`RECONCILE_AFTER_S` outside a rebalance (a
        rebalance-complete signal that never came, e.g. after a broker outage), write a
        checkpoint, let go of everything and take the right partitions at their positions."""
        if self._reader is None or self.app.rebalancing or getattr(self.app, "in_recovery", False):
            self._mismatch_since = None
            return
        try:
            assigned = self.app.consumer.assignment()
        except Exception:
            return
        ticks = self.settings.topic_ticks
        mine = {tp.partition for tp in assigned if tp.topic == ticks}
        if mine == self.reader.owned:
            self._mismatch_since = None
            return
        now = time.monotonic()
        if self._mismatch_since is None:
            self._mismatch_since = now
            return
        if now - self._mismatch_since < RECONCILE_AFTER_S:
            return
        log.warning(
            "reading clickstream partitions %s but Faust assigned ticks partitions %s for %.0f s:"
            " re-taking them from the checkpointed positions",
            sorted(self.reader.owned),
            sorted(mine),
            now - self._mismatch_since,
        )
        self._mismatch_since = None
        await self._before_revoke()
        await self._on_rebalance_complete(None)

    async def _on_revoked_signal(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        await self._before_revoke()

    async def _before_stop(self) -> None:
        """Worker stopping: stop reading, write the last checkpoint, close the clients."""
        self._running = False
        if self._reading is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reading), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                pass
        await self._before_revoke()
        if self._reader is not None:
            self._reader.close()
        if self._output is not None:
            self._output.flush_sync(10.0)

    # ------------------------------------------------------------------ the read loop

    async def _read_loop(self) -> None:
        """Batches from the reader into the engine; a checkpoint every :data:`CHECKPOINT_S`,
        written while the next batches are processed."""
        self._running = True
        self._reading = asyncio.current_task()
        # Faust, the campaigns and the codecs are alive for good: take them out of the cyclic
        # GC's scans, whose full passes stopped the event loop for ~80 ms (decision p99).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        while self._running:
            try:
                msgs = await self.reader.poll()  # (the reader may be replaced: sample_lag)
                if self.checkpointer.pending() >= CHECKPOINT_MAX_PENDING:
                    await self._finish_writing()  # backpressure: memory stays bounded
                async with self.busy:
                    if msgs:
                        await self._process(msgs)
                    due = time.monotonic() - self._last_checkpoint >= CHECKPOINT_S
                    if due or self.checkpointer.pending() >= CHECKPOINT_MAX_PENDING:
                        self._start_checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._fail(exc)
                return

    async def _fail(self, exc: BaseException) -> None:
        """The output refused a record or the state cannot be written: stop the worker (it
        restarts from its last checkpoint) rather than go on with a gap."""
        log.critical("trigger worker stops: %s: %s", type(exc).__name__, exc)
        self._running = False
        await self.app.crash(exc)

    def _start_checkpoint(self) -> None:
        """Take the buffer and write it in the background (at most one checkpoint at a time)."""
        if self._writer is not None and not self._writer.done():
            return
        taken = self.checkpointer.take()
        self._last_checkpoint = time.monotonic()
        if taken is not None:
            self._writer = asyncio.ensure_future(self._write(taken))

    async def _write(self, taken: Any) -> None:
        started = time.monotonic()
        try:
            positions = await self.checkpointer.write(taken)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(exc)
            return
        metrics.CHECKPOINT.observe(time.monotonic() - started)
        if positions and self._reader is not None:
            self.reader.commit(positions)

    async def _finish_writing(self) -> None:
        writer = self._writer
        if writer is not None:
            self._writer = None
            await writer

    async def _checkpoint_now(self) -> None:
        """A whole checkpoint with processing stopped (the caller holds :attr:`busy`)."""
        await self._finish_writing()
        self._start_checkpoint()
        await self._finish_writing()

    async def _process(self, msgs: list[Message]) -> None:
        """One batch, in order (the caller holds :attr:`busy`). The hot path of the worker:
        locals instead of attribute lookups, positions handed to the checkpointer once per
        partition per batch (no checkpoint can start while the caller holds :attr:`busy`)."""
        owned, positions = self.reader.owned, self.reader.positions
        consumed: dict[str, int] = {}
        vocabulary = self.vocabulary
        codec = self.codec
        send, on_click = self._send, self._on_click
        stats = self.stats
        touched: set[int] = set()
        countdown = YIELD_EVERY
        try:
            for msg in msgs:
                if msg.error() is not None:
                    log.warning("clickstream consumer error: %s", msg.error())
                    continue
                partition = msg.partition()
                if partition not in owned:
                    continue  # fetched just before the partition was released
                offset: int = msg.offset() or 0
                if offset < (positions.get(partition) or 0):
                    continue  # already applied (a replaced reader's last batch)
                key, value, headers = msg.key(), msg.value() or b"", msg.headers()
                try:
                    got = intake(codec, key, value, headers)
                except Exception:  # a registry outage, never bad data: wait for it
                    got = await self._intake(key, value, headers)
                if type(got) is ClickEvent:
                    stats.events += 1
                    event_type = got.event_type
                    label = event_type if event_type in vocabulary else metrics.OTHER
                    consumed[label] = consumed.get(label, 0) + 1
                    out = on_click(got, key, value, _Where(partition, offset))
                    if out:
                        send(out)
                elif isinstance(got, EndOfInput):
                    await self.flush_partition(partition)
                elif isinstance(got, Rejected):
                    where = _Where(partition, offset)
                    if not got.control:
                        stats.events += 1
                        click = got.event
                        label = metrics.OTHER
                        if click is not None:
                            label = metrics.event_type_label(click.event_type, vocabulary)
                        consumed[label] = consumed.get(label, 0) + 1
                    send([self._dead(key, value, got.reason, got.detail, where)])
                positions[partition] = offset + 1
                touched.add(partition)
                countdown -= 1
                if not countdown:
                    countdown = YIELD_EVERY
                    await asyncio.sleep(0)
        finally:
            advance = self.checkpointer.advance
            for partition in touched:
                advance(partition, positions[partition] or 0)  # set above: never None
            for label, n in consumed.items():
                metrics.EVENTS_CONSUMED.labels(label).inc(n)

    # ------------------------------------------------------------------ agents

    async def _ticks_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            if not self.live:
                continue  # the event clock moves with the events and flush records only
            partition = event.message.partition
            try:
                now_ms = decode_tick(event.value)
            except ValueError:
                log.warning("ignoring a malformed tick on partition %d", partition)
                continue
            self.stats.ticks += 1
            async with self.busy:
                if self._reader is None or partition not in self.reader.owned:
                    continue  # not (yet) ours on the clickstream side
                await self.advance_partition(partition, now_ms - self.lateness_ms)

    async def _send_ticks(self) -> None:
        """Leader only: one tick per partition of the ticks topic (co-partitioned)."""
        value = encode_tick(self.clock.now_ms())
        for partition in range(self.settings.partitions):  # fire and forget: a lost tick is
            self.output.send(  # made up for by the next one
                self.settings.topic_ticks, value, str(partition).encode(), partition=partition
            )

    async def sample_lag(self) -> None:
        """Every worker: records behind the log end on its clickstream partitions ->
        ``nudgeflow_consumer_lag`` (group ``<worker id>-clickstream``, the reader's positions)."""
        if self._reader is None:
            return
        loop = asyncio.get_running_loop()
        try:
            lags = await loop.run_in_executor(None, self.reader.lag)
        except Exception as exc:  # mid-rebalance or broker away: try again next interval
            log.debug("consumer lag not sampled: %s: %s", type(exc).__name__, exc)
            return
        topic = self.settings.topic_clickstream
        metrics.set_consumer_lag(
            offsets_group(self.settings.worker_id), {(topic, p): n for p, n in lags.items()}
        )

    # ------------------------------------------------------------------ time

    async def flush_partition(self, partition: int) -> None:
        """End of input on ``partition``: commit every pending timer of its users."""
        self.stats.flushes += 1
        users = self.timers.partition(partition).all_users()
        await self._advance_users(partition, users, FLUSH_MS)
        # Forward end of input to every send-topic partition, after this partition's decisions.
        headers = dict(flush_headers(partition, self.settings.partitions))
        for target in range(self.settings.partitions):
            self.output.send(
                self.settings.topic_decisions, b"", None, partition=target, headers=headers
            )

    async def advance_partition(self, partition: int, watermark_ms: int) -> None:
        """Move time to ``watermark_ms`` for the users of ``partition`` that are due."""
        users = self.timers.partition(partition).pop_due(watermark_ms)
        await self._advance_users(partition, users, watermark_ms)
        last = self.tick_watermarks.get(partition, watermark_ms)  # for Engine.on_event
        self.tick_watermarks[partition] = max(last, watermark_ms)

    async def _advance_users(self, partition: int, users: list[str], watermark_ms: int) -> None:
        for i, user_id in enumerate(users, 1):
            self._send(self._on_time(user_id, partition, watermark_ms))
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    # ------------------------------------------------------------------ synchronous core calls

    def _on_click(
        self, click: ClickEvent, key: bytes | None, value: bytes, where: _Where
    ) -> list[Out]:
        partition = where.partition
        user_key = click.user_id.encode()  # == key: processors.intake checked it
        raw = None
        try:
            raw = self.checkpointer.get(partition, user_key)
            state = self._load(user_key, raw)
            before = self._open_campaigns(state)  # the engine changes ``state`` in place
            step = self.engine.on_event(state, click, self.tick_watermarks.get(partition))
            out = (
                self._outputs(step, current=(click, key, value, where))
                if step.decisions or step.cancellations or step.rejected
                else []
            )
            unchanged = state is not None and any(ev is click for ev, _ in step.rejected)
            if not unchanged:
                self._store(user_key, click.user_id, partition, step, raw)
                self._note_episodes(partition, before, step.state)
        except Exception as exc:  # an engine/state bug must not stop the partition
            self._rollback(partition, user_key, raw)
            log.exception(
                "engine failed on event %s (partition %d offset %d)",
                click.event_id,
                partition,
                where.offset,
            )
            return [self._dead(key, value, "internal_error", type(exc).__name__, where)]
        return out

    def _on_time(self, user_id: str, partition: int, watermark_ms: int) -> list[Out]:
        timers = self.timers.partition(partition)
        timers.discard(user_id)
        user_key = user_id.encode()
        raw = None
        try:
            raw = self.checkpointer.get(partition, user_key)
            state = self._load(user_key, raw)
            if state is None:
                return []
            before = self._open_campaigns(state)
            step = self.engine.on_time(state, watermark_ms)
            out = self._outputs(step, current=None)
            self._store(user_key, user_id, partition, step, raw)
            self._note_episodes(partition, before, step.state)
        except Exception:
            # The timer is dropped (the user's next event re-arms it).
            self._rollback(partition, user_key, raw)
            self.stats.timer_errors += 1
            log.exception("engine.on_time failed for a user of partition %d", partition)
            return []
        return out

    def _load(self, user_key: bytes, raw: Any) -> UserState | None:
        """The user's state from what the buffer/store holds (the live object itself if it
        changed since the last checkpoint)."""
        if type(raw) is LiveState:
            return raw.state
        return self.states.state(user_key, raw)

    def _rollback(self, partition: int, user_key: bytes, raw: Any) -> None:
        """A step failed half-way through a state the engine changes in place: forget the
        decoded copy and, if the buffer held the live object, put back the value it had at the
        last checkpoint (changes of this user since then are dropped with it, and logged)."""
        self.states.forget(user_key)
        if type(raw) is LiveState:
            log.error(
                "a user's state on partition %d goes back to its last checkpoint after an "
                "engine failure",
                partition,
            )
            self.checkpointer.put(partition, user_key, raw.base)

    def _store(
        self,
        user_key: bytes,
        user_id: str,
        partition: int,
        step: Step,
        previous: Any,
    ) -> None:
        """Buffer the user's new state (None = delete) as a :class:`LiveState`, encoded by the
        next checkpoint (``previous``: what the buffer or store held before the step)."""
        timers = self.timers.partition(partition)  # build the index before changing the table
        state = step.state
        if state is None:
            if previous is not None:
                self.checkpointer.put(partition, user_key, None)
            self.states.forget(user_key)
            timers.discard(user_id)
            return
        if type(previous) is LiveState and previous.state is state:
            previous.wake_at = step.wake_at  # already buffered: the object is the state
        else:
            base = previous.base if type(previous) is LiveState else previous
            self.checkpointer.put(
                partition,
                user_key,
                LiveState(self.states, user_key, partition, state, step.wake_at, base),
            )
        timers.set(user_id, step.wake_at)

    def _note_episodes(
        self, partition: int, before: frozenset[str], state: UserState | None
    ) -> None:
        """``nudgeflow_open_episodes``: the user's open campaigns went from ``before`` to those
        of ``state`` (most steps change none: no gauge update then)."""
        after = self._open_campaigns(state)
        if before != after:
            self.episodes.change(partition, before, after)

    def _open_campaigns(self, state: UserState | None) -> frozenset[str]:
        """Campaigns with a pending timer (open episodes) in the user's head state: committed
        plus the tail, so a cart shows as open as soon as its event is applied, not only once
        the watermark has committed it."""
        if state is None:
            return _NONE_OPEN
        open_now = state.open_campaigns()
        if not open_now:
            return _NONE_OPEN
        ids = frozenset(open_now)
        return ids if ids <= self.campaign_ids else ids & self.campaign_ids

    def _scan_table(self) -> list[tuple[str, StoredState]]:
        """The timer index's rebuild scan; also recounts the open episodes (only users with a
        pending wake-up can have one, so only their states are decoded)."""
        entries: list[tuple[str, StoredState]] = []
        counts: dict[int, Counter[str]] = {}
        values: dict[bytes, bytes | None] = dict(self.table.data.items())
        values.update(self.checkpointer.buffered())  # not yet written
        for key, value in values.items():
            if value is None or is_position_key(key):
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
        owned = set(self._reader.owned) if self._reader is not None else set(counts)
        self.episodes.reset(counts, owned)
        return entries

    def _outputs(
        self, step: Step, current: tuple[ClickEvent, bytes | None, bytes, Any] | None
    ) -> list[Out]:
        """Encode everything ``step`` produced (before the state is stored: an encoding error
        leaves the state as it was)."""
        out: list[Out] = []
        decisions = self.settings.topic_decisions
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
        dlq = self.settings.topic_clickstream_dlq
        return Out(dlq, "dead_letter", key, value or b"", headers, reason)

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

    def _send(self, out: list[Out]) -> None:
        """Hand records to the producer (metrics count them here: they are then on their way;
        the next checkpoint proves they landed)."""
        output = self.output
        for o in out:
            output.send(o.topic, o.value, o.key, headers=o.headers)
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
        state_ttl_ms=int(settings.state_ttl_s * 1000),
        # Lazy commits decide which tick wakes a quiet tail; the event clock has no ticks (the
        # end-of-input flush commits every tail), where they only cost a tail scan per event.
        lazy_commit=live,
    )
    return TriggerShell(app, settings, engine, codec or Codec(settings.schema_registry_url))
