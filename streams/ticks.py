"""Time for the worker's users: ticks (live clock) and end of input (both clocks).

Live clock: the group leader writes the wall clock to every partition of the ticks topic every
:data:`TICK_INTERVAL_S` (:meth:`Ticks.send`); the ticks agent (:meth:`Ticks.agent`, a Faust
agent: the ticks topic carries the partition assignment) keeps the newest tick of each partition
and applies it at once if the worker's lock is free, else the read loop applies it after the
slice of a batch it is processing (:meth:`Ticks.apply`): a partition this worker reads moves
its watermark to ``tick - allowed lateness`` and every user whose timer is due takes a step
(:meth:`streams.steps.Steps.on_time`).
Only the newest tick of a partition matters, so ticks that queued up while the worker was busy
cost one move of time, not one wait for the worker's lock each. The event clock ignores
tick values. End of input (a flush control record) commits every pending timer of the
partition's users and forwards the marker to every ``sms-decisions`` partition.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import faust

from processors import metrics
from processors.core.clock import Clock
from processors.core.engine import FLUSH_MS
from processors.kafka.control import flush_headers
from processors.settings import Settings
from streams.clients import Clients
from streams.emit import Emitter
from streams.state.users import UserStates
from streams.stats import WorkerStats
from streams.steps import Steps

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.1  # a due timer waits at most this long for its tick
YIELD_EVERY = 1000  # users between turns given to the event loop (heartbeats)
_TICK = struct.Struct(">q")


def encode_tick(now_ms: int) -> bytes:
    return _TICK.pack(now_ms)


def decode_tick(value: bytes | None) -> int:
    """Tick value: 8-byte big-endian epoch ms (what we send) or ASCII digits (hand-made ticks)."""
    if value is not None and len(value) == _TICK.size:
        return int(_TICK.unpack(value)[0])
    if value and value.strip().isdigit():
        return int(value)
    raise ValueError("tick value must be 8-byte big-endian or ASCII epoch milliseconds")


class Ticks:
    """Moves time for the users of a partition."""

    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        users: UserStates,
        steps: Steps,
        emitter: Emitter,
        busy: asyncio.Lock,
        stats: WorkerStats,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.users = users
        self.steps = steps
        self.emitter = emitter
        self.busy = busy
        self.stats = stats
        self.clock = clock
        self.live = settings.clock == "live"
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)
        self.pending: dict[int, int] = {}
        """Partition -> its newest tick not yet applied (epoch ms)."""

    async def agent(self, stream: faust.StreamT) -> None:
        """The ticks agent: keeps each partition's newest tick and applies it at once when the
        worker's lock is free (the read loop waits for a fetch or a checkpoint)."""
        pending, busy = self.pending, self.busy
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
            if now_ms > pending.get(partition, -1):
                pending[partition] = now_ms
            if not busy.locked():  # else the read loop applies it after its slice
                async with busy:
                    await self.apply()

    async def apply(self) -> None:
        """Move time with the ticks kept since the last call (the caller holds the worker's
        lock); ``nudgeflow_tick_delay_seconds``: how long after its own time each tick moved
        its partition."""
        if not self.pending:
            return
        pending = dict(self.pending)
        self.pending.clear()  # the same dict: the agent holds it
        if not self.clients.reading:
            return
        owned, now, delay = self.clients.reader.owned, self.clock.now_ms(), metrics.TICK_DELAY
        for partition, tick_ms in pending.items():
            if partition in owned:  # else: not (yet) ours on the clickstream side
                delay.observe(max(0, now - tick_ms) / 1000)
                await self.advance_partition(partition, tick_ms - self.lateness_ms)

    async def send(self) -> None:
        """Leader only: one tick per partition of the ticks topic (co-partitioned)."""
        value = encode_tick(self.clock.now_ms())
        output = self.clients.output
        for partition in range(self.settings.partitions):  # fire and forget: a lost tick is
            output.send(  # made up for by the next one
                self.settings.topic_ticks, value, str(partition).encode(), partition=partition
            )

    async def flush_partition(self, partition: int) -> None:
        """End of input on ``partition``: commit every pending timer of its users."""
        self.stats.flushes += 1
        users = self.users.timers.partition(partition).all_users()
        await self._advance_users(partition, users, FLUSH_MS)
        # Forward end of input to every send-topic partition, after this partition's decisions.
        headers = dict(flush_headers(partition, self.settings.partitions))
        for target in range(self.settings.partitions):
            self.clients.output.send(
                self.settings.topic_decisions, b"", None, partition=target, headers=headers
            )

    async def advance_partition(self, partition: int, watermark_ms: int) -> None:
        """Move time to ``watermark_ms`` for the users of ``partition`` that are due."""
        users = self.users.timers.partition(partition).pop_due(watermark_ms)
        await self._advance_users(partition, users, watermark_ms)
        watermarks = self.steps.tick_watermarks  # for Engine.on_event
        last = watermarks.get(partition, watermark_ms)
        watermarks[partition] = max(last, watermark_ms)

    async def _advance_users(self, partition: int, users: list[str], watermark_ms: int) -> None:
        send, on_time = self.emitter.send, self.steps.on_time
        for i, user_id in enumerate(users, 1):
            send(on_time(user_id, partition, watermark_ms))
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
