"""The one producer of the dispatcher: outcomes, dead letters and end-of-input markers.

Each record gets a sequence number; its delivery report says when the offsets that produced
it may be committed (:class:`~processors.dispatcher.offsets.Offsets`), and marks a published
outcome as emitted in Redis at the next commit.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from processors import metrics
from processors.core.outcome import SmsOutcome
from processors.core.policy import Step
from processors.kafka.control import flush_headers
from processors.kafka.headers import DLQ_REASON_HEADER
from processors.settings import Settings
from schemas.codec import Codec

log = logging.getLogger("nudgeflow.dispatcher")

LINGER_MS = 50
"""How long the producer gathers outcomes into one batch: nothing waits on an outcome's
arrival (commits wait for delivery reports, every 0.2 s), and the broker's CPU per decision
halves against 5 ms."""

_BY_REASON = {
    "suppressed": metrics.SMS_SUPPRESSED,
    "failed": metrics.SMS_FAILED,
    "cancelled": metrics.SMS_CANCELLED,
}


@dataclass
class Stats:
    """Counts by status and reason (log-safe: no ids, numbers or text)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    decisions: int = 0
    cancels: int = 0
    undecodable: int = 0
    end_of_input: int = 0


class OutcomeCounters:
    """Prometheus counters by outcome (campaign, variant and reason only: never a user), and
    the deferred gauge: +1 where a send is deferred, -1 where a held send ends (deferred here,
    or claimed from the shared backlog here: the sum over dispatchers is the backlog)."""

    def __init__(self) -> None:
        self.deferred_ids: set[str] = set()  # deferred here
        self.released_ids: set[str] = set()  # claimed from the shared deferred backlog here
        self._by_reason: dict[tuple[str, str, str], Any] = {}  # metric children

    def released(self, step: Step) -> None:
        """``step`` comes from a deferred send claimed here."""
        if step.send is not None:
            self.released_ids.add(step.send.decision.decision_id)
        self.released_ids.update(o.decision_id for o in step.outcomes)

    def count(self, outcome: SmsOutcome) -> None:
        campaign, reason = outcome.campaign_id, outcome.reason or "none"
        did = outcome.decision_id
        held = did in self.deferred_ids or did in self.released_ids
        if held and outcome.status != "deferred":
            self.deferred_ids.discard(did)
            self.released_ids.discard(did)
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
            self.deferred_ids.add(did)
            metrics.SMS_DEFERRED.labels(campaign=campaign).inc()


class Output:
    """Hands records to the producer and keeps their delivery reports."""

    def __init__(self, settings: Settings, codec: Codec, stats: Stats) -> None:
        self.settings = settings
        self.codec = codec
        self.stats = stats
        self.counters = OutcomeCounters()
        self.producer = Producer(
            {**settings.kafka_common(), "enable.idempotence": True, "linger.ms": LINGER_MS}
        )
        self.produced = 0  # records handed to the producer so far (each one's sequence number)
        self.undelivered: set[int] = set()  # sequence numbers without a delivery report yet
        self.to_mark: list[tuple[str, str, str]] = []  # delivered outcomes (Redis "emitted")
        self.delivery_errors: list[str] = []
        self._labels: dict[tuple[str, str | None], str] = {}  # (status, reason) -> Stats key

    def publish(self, step: Step) -> None:
        """A step's outcomes, then its dead letter."""
        for outcome in step.outcomes:
            self.outcome(outcome)
        if step.dead_letter is not None:
            decision, reason = step.dead_letter
            value = self.codec.encode("TriggerDecision", decision.to_record())
            self.dead_letter(decision.user_id.encode(), value, reason)

    def outcome(self, outcome: SmsOutcome) -> None:
        value = self.codec.encode("SmsOutcome", outcome.to_record())
        status, reason = outcome.status, outcome.reason
        mark = (outcome.user_id, outcome.decision_id, status)
        self.produce(self.settings.topic_outcomes, outcome.user_id.encode(), value, mark=mark)
        label = self._labels.get((status, reason))
        if label is None:
            label = self._labels[(status, reason)] = f"{status}:{reason or '-'}"
        self.stats.outcomes[label] += 1
        self.counters.count(outcome)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "decision %s (%s): %s%s",
                outcome.decision_id,
                outcome.campaign_id,
                outcome.status,
                f" ({outcome.reason})" if outcome.reason else "",
            )

    def dead_letter(self, key: bytes | None, value: bytes | None, reason: str) -> None:
        self.produce(
            self.settings.topic_sms_dlq, key, value, headers=[(DLQ_REASON_HEADER, reason.encode())]
        )

    def end_markers(self, sources: list[int]) -> None:
        """Like the worker: for each decisions partition we own (a source), a marker on every
        outcomes partition, so a reader knows when every source is complete; delivered before
        this returns."""
        topic, decisions = self.settings.topic_outcomes, self.settings.topic_decisions
        meta = self.producer.list_topics(topic, timeout=10).topics[topic]
        count = len(self.producer.list_topics(decisions, timeout=10).topics[decisions].partitions)
        for source in sources:
            for partition in sorted(meta.partitions):
                headers = flush_headers(source, count)
                self.produce(topic, None, b"", headers=headers, partition=partition)
        if self.producer.flush(30):
            raise RuntimeError("could not deliver the end-of-input markers")

    def produce(
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
        self.produced += 1
        seq = self.produced
        undelivered, to_mark, errors = self.undelivered, self.to_mark, self.delivery_errors
        undelivered.add(seq)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            undelivered.discard(seq)
            if err is not None:
                errors.append(err.str())
            elif mark is not None:
                to_mark.append(mark)

        produce = self.producer.produce
        kwargs: dict[str, Any] | None = None
        if headers or partition is not None:
            kwargs = {"headers": headers} if headers else {}
            if partition is not None:
                kwargs["partition"] = partition
        while True:
            try:
                if kwargs is None:  # an outcome: the common case, no keyword dict
                    produce(topic, value, key, on_delivery=delivered)
                else:
                    produce(topic, value, key, on_delivery=delivered, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.1)
