"""The read loop: clickstream batches -> intake -> engine -> outputs, checkpoints between.

Each batch from the reader (:mod:`streams.reader`) is processed in order under the worker's
lock (:meth:`Pipeline.process`): every record is classified by :func:`streams.intake.intake`
(bad data is dead-lettered byte for byte with a reason; a registry outage is waited out, never
dead-lettered), events go to :meth:`streams.steps.Steps.on_click`, end-of-input records to
:meth:`streams.ticks.Ticks.flush_partition`, and the partition's position advances past the
record. Batches are processed in slices of :data:`SLICE` records; between slices the live
clock's newest ticks move time (:meth:`streams.ticks.Ticks.apply`) and the lock is let go.
Checkpoints are started between batches (:mod:`streams.state.writer`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from confluent_kafka import Message

from processors import metrics
from processors.core.events import ClickEvent
from schemas.codec import Codec
from streams.clients import Clients
from streams.emit import Emitter
from streams.gcpolicy import GcPolicy
from streams.intake import EndOfInput, Intake, Rejected, intake
from streams.state.writer import CheckpointWriter
from streams.stats import WorkerStats
from streams.steps import Steps, Where
from streams.ticks import Ticks

log = logging.getLogger(__name__)

YIELD_EVERY = 1000  # records between turns given to the event loop (heartbeats)
SLICE = 1000  # records per hold of the worker's lock: a due timer waits for at most one slice
_REGISTRY_RETRY_MAX_S = 30.0


class Pipeline:
    """The worker's read loop and its batch path."""

    def __init__(
        self,
        codec: Codec,
        clients: Clients,
        steps: Steps,
        emitter: Emitter,
        ticks: Ticks,
        writer: CheckpointWriter,
        busy: asyncio.Lock,
        stats: WorkerStats,
        vocabulary: frozenset[str],
        fail: Callable[[BaseException], Awaitable[None]],
    ) -> None:
        """``vocabulary``: the event types some enabled campaign reads (metric labels);
        ``fail``: stops the worker when the output or the state cannot be written."""
        self.codec = codec
        self.clients = clients
        self.steps = steps
        self.emitter = emitter
        self.ticks = ticks
        self.writer = writer
        self.busy = busy
        self.stats = stats
        self.vocabulary = vocabulary
        self.fail = fail
        self.running = False
        self.gc = GcPolicy()
        self._reading: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Batches from the reader into the engine until :meth:`stop` (a Faust task); a
        checkpoint every ``settings.worker_checkpoint_interval_ms``, written while the next
        batches are processed."""
        self.running = True
        self._reading = asyncio.current_task()
        self.gc.install()
        try:
            await self._loop()
        finally:
            self.gc.uninstall()

    async def _loop(self) -> None:
        writer, busy, ticks = self.writer, self.busy, self.ticks
        while self.running:
            try:
                msgs = await self.clients.reader.poll()
                if writer.full():
                    await writer.finish()  # backpressure: memory stays bounded
                # Time moves between slices of a batch: a due timer or expiry waits for at most
                # one slice, and the lock is let go between them (ticks, rebalance handlers).
                for start in range(0, len(msgs), SLICE):
                    async with busy:
                        await self.process(msgs[start : start + SLICE])
                        await ticks.apply()
                async with busy:
                    await ticks.apply()
                    if writer.due():
                        writer.start()
                        self.gc.settle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self.fail(exc)
                return

    async def stop(self) -> None:
        """Stop reading: the loop ends after the batch in hand (waited for up to 5 s)."""
        self.running = False
        if self._reading is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reading), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                pass

    async def process(self, msgs: list[Message]) -> None:
        """One batch, in order (the caller holds the worker's lock). The hot path of the worker:
        locals instead of attribute lookups; per batch, not per record, the count of events by
        type (metric labels) and the positions handed to the checkpointer (no checkpoint can
        start while the caller holds the lock); the reader's positions are up to date at every
        ``await``."""
        reader = self.clients.reader
        owned, positions = reader.owned, reader.positions
        by_type: dict[str, int] = {}  # event type -> events (the label is chosen per batch)
        ends: dict[int, int] = {}  # partition -> next offset, not yet in ``positions``
        codec = self.codec
        send, dead, steps = self.emitter.send, self.emitter.dead, self.steps
        touched: set[int] = set()
        events = 0
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
                end = ends.get(partition)
                if end is None:
                    end = positions.get(partition) or 0
                if offset < end:
                    continue  # already applied (a replaced reader's last batch)
                key, value, headers = msg.key(), msg.value() or b"", msg.headers()
                try:
                    got = intake(codec, key, value, headers)
                except Exception:  # a registry outage, never bad data: wait for it
                    positions.update(ends)
                    got = await self._intake(key, value, headers)
                if type(got) is ClickEvent:
                    events += 1
                    event_type = got.event_type
                    by_type[event_type] = by_type.get(event_type, 0) + 1
                    # ``key`` is ``got.user_id`` encoded (intake checked it)
                    out = steps.on_click(got, key, value, partition, offset)  # type: ignore[arg-type]
                    if out:
                        send(out)
                elif isinstance(got, EndOfInput):
                    positions.update(ends)
                    await self.ticks.flush_partition(partition)
                elif isinstance(got, Rejected):
                    where = Where(partition, offset)
                    if not got.control:
                        events += 1
                        click = got.event
                        label = metrics.OTHER if click is None else click.event_type
                        by_type[label] = by_type.get(label, 0) + 1
                    send([dead(key, value, got.reason, got.detail, where)])
                ends[partition] = offset + 1
                countdown -= 1
                if not countdown:
                    countdown = YIELD_EVERY
                    positions.update(ends)
                    touched.update(ends)
                    ends.clear()
                    await asyncio.sleep(0)
        finally:
            positions.update(ends)
            touched.update(ends)
            self.stats.events += events
            advance = self.clients.checkpointer.advance
            for partition in touched:
                advance(partition, positions[partition] or 0)  # set above: never None
            consumed: dict[str, int] = {}
            vocabulary = self.vocabulary
            for event_type, n in by_type.items():
                label = metrics.event_type_label(event_type, vocabulary)
                consumed[label] = consumed.get(label, 0) + n
            for label, n in consumed.items():
                metrics.EVENTS_CONSUMED.labels(label).inc(n)
            steps.episodes.publish()

    async def _intake(self, key: bytes | None, value: bytes | None, headers: Any) -> Intake:
        """:func:`streams.intake.intake`; bad data comes back as ``Rejected``, so whatever it
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
