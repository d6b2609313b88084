"""What the worker writes for a step, and handing it to the producer.

Decisions and cancellations are encoded (Confluent wire-format Avro, :mod:`schemas.codec`) for
``sms-decisions``, keyed by user id; a dead letter is the clickstream record byte for byte with
a machine-readable reason and a log-safe detail header, for ``clickstream-dlq``. Every record
goes through the one producer (:mod:`streams.output`) and is counted in the metrics then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from processors import metrics
from processors.core.clock import Clock
from processors.core.decision import Decision
from processors.core.engine import Step
from processors.core.events import ClickEvent
from processors.settings import Settings
from schemas.codec import Codec
from streams.clients import Clients
from streams.stats import WorkerStats
from streams.topics import DLQ_DETAIL_HEADER, DLQ_REASON_HEADER

log = logging.getLogger(__name__)


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


class Emitter:
    """Encodes steps into :class:`Out` records and sends them."""

    def __init__(
        self, settings: Settings, codec: Codec, clients: Clients, stats: WorkerStats, clock: Clock
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.clients = clients
        self.stats = stats
        self.clock = clock
        self.live = settings.clock == "live"
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)

    def records(
        self, step: Step, current: tuple[ClickEvent, bytes | None, bytes, Any] | None
    ) -> list[Out]:
        """Encode everything ``step`` produced (before the state is stored: an encoding error
        leaves the state as it was). ``current``: the event being applied with its record's
        key, value and position (a rejected ``current`` is dead-lettered byte for byte)."""
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
                out.append(self.dead(current[1], current[2], reason, detail, current[3]))
            else:
                raw = self.codec.encode("ClickEvent", ev.to_record())
                out.append(self.dead(ev.user_id.encode(), raw, reason, detail, None))
        return out

    def dead(
        self, key: bytes | None, value: bytes | None, reason: str, detail: str, where: Any
    ) -> Out:
        """A dead letter of a clickstream record (``where``: its partition and offset, for the
        log line; None for an event the engine held)."""
        count = self.stats.dead_letters[reason] = self.stats.dead_letters[reason] + 1
        if count <= 10 or count % 1000 == 0:  # no flood of logs on a bad replay
            at = (
                f" (partition {where.partition} offset {where.offset})" if where is not None else ""
            )
            log.warning("dead-lettering a clickstream record: %s%s [#%d]", reason, at, count)
        headers = {DLQ_REASON_HEADER: reason.encode(), DLQ_DETAIL_HEADER: detail[:500].encode()}
        dlq = self.settings.topic_clickstream_dlq
        return Out(dlq, "dead_letter", key, value or b"", headers, reason)

    def send(self, out: list[Out]) -> None:
        """Hand records to the producer (metrics count them here: they are then on their way;
        the next checkpoint proves they landed)."""
        output = self.clients.output
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
