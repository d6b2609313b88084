"""Faust agents of the trigger worker: a thin shell that moves records in and out of the engine.

All trigger logic is in :class:`processors.core.engine.Engine`; this module only

* decodes clickstream records (bad ones go to the DLQ byte for byte, with a reason header),
* loads/stores each user's engine state in the ``user_state`` table (changelog-backed),
* moves time: flush control records (both clocks) and, with the live clock, ticks,
* encodes decisions and cancellations onto ``sms-decisions`` keyed by user id.

Concurrency: the clickstream agent and the ticks agent run as two asyncio tasks over the same
table. Each user's read-engine-write runs without an ``await`` in between, so the two never
interleave on one user; sends happen after the state is stored. Delivery is at least once (Faust
flushes the producer before committing offsets): after a crash a few events may be re-applied,
which the engine de-duplicates by ``event_id``, and decision ids are deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import TopicT

from processors.control import flush_headers
from processors.core.campaign import CampaignSet
from processors.core.clock import Clock, SystemClock
from processors.core.engine import FLUSH_MS, Engine, Step, UserState
from processors.core.events import ClickEvent, EventError
from processors.settings import Settings
from schemas.codec import Codec, CodecError
from streams.timers import StoredState, TimerIndex, pack_state, unpack_state
from streams.topics import (
    CONTROL_HEADER,
    DLQ_DETAIL_HEADER,
    DLQ_REASON_HEADER,
    FLUSH,
    Topics,
    make_topics,
)

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 1.0
YIELD_EVERY = 256  # users per flush/tick batch before giving the event loop (heartbeats) a turn
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


def header(headers: Any, name: str) -> bytes | None:
    """Value of header ``name`` (Faust gives a tuple of ``(str, bytes)`` pairs, or a mapping)."""
    if not headers:
        return None
    items = headers.items() if hasattr(headers, "items") else headers
    for key, value in items:
        if key == name:
            return bytes(value) if value is not None else None
    return None


def reason_tag(exc: Exception) -> str:
    """``NotWireFormat`` -> ``not_wire_format``: the DLQ reason of a codec error."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


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
        self.stats = ShellStats()
        app.agent(self.topics.clickstream, name="nudgeflow.clickstream")(self._clickstream_agent)
        if settings.clock == "live":
            app.agent(self.topics.ticks, name="nudgeflow.ticks")(self._ticks_agent)
            app.timer(TICK_INTERVAL_S, on_leader=True, name="nudgeflow.send_ticks")(
                self._send_ticks
            )
        app.on_partitions_revoked.connect(self._on_rebalance)
        app.on_partitions_assigned.connect(self._on_rebalance)

    # ------------------------------------------------------------------ agents

    async def _clickstream_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            key, value = event.key, event.value
            control = header(msg.headers, CONTROL_HEADER)
            if control == FLUSH:
                await self.flush_partition(msg.partition)
                continue
            if control is not None:
                detail = f"{CONTROL_HEADER} header must be 'flush'"
                await self._send([self._dead(key, value, "unknown_control", detail, msg)])
                continue
            self.stats.events += 1
            try:
                record = await self._decode_click(value)
                click = ClickEvent.from_record(record)
            except CodecError as exc:
                await self._send([self._dead(key, value, reason_tag(exc), str(exc), msg)])
                continue
            except EventError as exc:
                await self._send([self._dead(key, value, exc.reason, exc.detail, msg)])
                continue
            await self._send(self._on_click(click, key, value, msg))

    async def _ticks_agent(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            partition = event.message.partition
            try:
                now_ms = decode_tick(event.value)
            except ValueError:
                log.warning("ignoring a malformed tick on partition %d", partition)
                continue
            self.stats.ticks += 1
            await self.advance_partition(partition, now_ms - self.lateness_ms)

    async def _send_ticks(self) -> None:
        """Leader only: one tick per partition of the ticks topic (co-partitioned)."""
        value = encode_tick(self.clock.now_ms())
        for partition in range(self.settings.partitions):
            await self.topics.ticks.send(
                key=str(partition).encode(), value=value, partition=partition
            )

    def _on_rebalance(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        self.timers.clear()

    # ------------------------------------------------------------------ time

    async def flush_partition(self, partition: int) -> None:
        """End of input on ``partition``: commit every pending timer of its users."""
        self.stats.flushes += 1
        users = self.timers.partition(partition).all_users()
        await self._advance_users(partition, users, FLUSH_MS)
        # Forward end of input to every send-topic partition, after this partition's decisions.
        headers = dict(flush_headers(partition, self.settings.partitions))
        for target in range(self.settings.partitions):
            await self.topics.decisions.send(value=b"", partition=target, headers=headers)

    async def advance_partition(self, partition: int, watermark_ms: int) -> None:
        """Move time to ``watermark_ms`` for the users of ``partition`` that are due."""
        users = self.timers.partition(partition).pop_due(watermark_ms)
        await self._advance_users(partition, users, watermark_ms)

    async def _advance_users(self, partition: int, users: list[str], watermark_ms: int) -> None:
        for i, user_id in enumerate(users, 1):
            await self._send(self._on_time(user_id, partition, watermark_ms))
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    # ------------------------------------------------------------------ synchronous core calls

    def _on_click(self, click: ClickEvent, key: bytes | None, value: bytes, msg: Any) -> list[Out]:
        user_key = click.user_id.encode()
        if key != user_key:
            return [
                self._dead(
                    key,
                    value,
                    "key_mismatch",
                    "the record key is not the event's user_id (clickstream must be keyed by "
                    "user_id so that each user's events share a partition)",
                    msg,
                )
            ]
        try:
            state = self._load(user_key)
            step = self.engine.on_event(state, click)
            out = self._outputs(step, current=(click, key, value, msg))
            unchanged = state is not None and any(ev is click for ev, _ in step.rejected)
            if not unchanged:
                self._store(user_key, click.user_id, msg.partition, step)
        except Exception as exc:  # an engine/state bug must not stop the partition
            log.exception(
                "engine failed on event %s (partition %d offset %d)",
                click.event_id,
                msg.partition,
                msg.offset,
            )
            return [self._dead(key, value, "internal_error", type(exc).__name__, msg)]
        return out

    def _on_time(self, user_id: str, partition: int, watermark_ms: int) -> list[Out]:
        timers = self.timers.partition(partition)
        timers.discard(user_id)
        user_key = user_id.encode()
        try:
            state = self._load(user_key)
            if state is None:
                return []
            step = self.engine.on_time(state, watermark_ms)
            out = self._outputs(step, current=None)
            self._store(user_key, user_id, partition, step)
        except Exception:
            # The timer is dropped (the user's next event re-arms it); the state is untouched.
            self.stats.timer_errors += 1
            log.exception("engine.on_time failed for a user of partition %d", partition)
            return []
        return out

    def _load(self, user_key: bytes) -> UserState | None:
        raw = self.table.get(user_key)
        if raw is None:
            return None
        return UserState.from_bytes(unpack_state(raw).state)

    def _store(self, user_key: bytes, user_id: str, partition: int, step: Step) -> None:
        timers = self.timers.partition(partition)  # build the index before changing the table
        if step.state is None:
            if user_key in self.table:
                del self.table[user_key]
            timers.discard(user_id)
            return
        self.table[user_key] = pack_state(partition, step.wake_at, step.state.to_bytes())
        timers.set(user_id, step.wake_at)

    def _scan_table(self) -> list[tuple[str, StoredState]]:
        entries: list[tuple[str, StoredState]] = []
        for key, value in self.table.items():
            try:
                entries.append((key.decode(), unpack_state(value)))
            except (ValueError, AttributeError):
                log.error("skipping an unreadable user_state entry while rebuilding timers")
        return entries

    def _outputs(
        self, step: Step, current: tuple[ClickEvent, bytes | None, bytes, Any] | None
    ) -> list[Out]:
        """Encode everything ``step`` produced (before the state is stored: an encoding error
        leaves the state as it was)."""
        out: list[Out] = []
        decisions = self.topics.decisions
        for d in step.decisions:
            value = self.codec.encode("TriggerDecision", d.to_record())
            out.append(Out(decisions, "decision", d.user_id.encode(), value))
        for c in step.cancellations:
            value = self.codec.encode("DecisionCancelled", c.to_record())
            out.append(Out(decisions, "cancellation", c.user_id.encode(), value))
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
        return Out(self.topics.clickstream_dlq, "dead_letter", key, value or b"", headers)

    # ------------------------------------------------------------------ I/O

    async def _decode_click(self, value: bytes | None) -> dict[str, Any]:
        """Decode; registry outages (anything but ``CodecError``) are retried, not dead-lettered."""
        delay = 0.5
        while True:
            try:
                return self.codec.decode_as("ClickEvent", value)
            except CodecError:
                raise
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
            elif o.kind == "cancellation":
                self.stats.cancellations += 1


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
