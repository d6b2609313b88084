"""Which consumed offsets are handled, and committing them once their output is delivered.

An offset is committed only after the outcomes and dead letters of every decision up to it are
confirmed delivered; then the published outcomes are marked emitted in Redis (a redelivery
re-publishes what is not).
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

from processors import metrics
from processors.dispatcher.output import Output
from processors.redis import RedisStore
from processors.settings import Settings

log = logging.getLogger("nudgeflow.dispatcher")

TP = tuple[str, int]
Ref = tuple[TP, int]
"""A consumed record: (topic, partition) and offset."""


class Offsets:
    """Per partition, offset -> False until handled, then the stamp of its output: every
    record it produced has a sequence number below the stamp."""

    def __init__(
        self,
        consumer: Consumer,
        output: Output,
        store: RedisStore,
        redis_down: tuple[type[Exception], ...],
        interval_s: float,
    ) -> None:
        self.consumer = consumer
        self.output = output
        self.store = store
        self.redis_down = redis_down
        self.interval_s = interval_s
        self.pending: dict[TP, dict[int, int | bool]] = {}
        self._last_commit = 0.0
        self._last_lag = 0.0

    def consumed(self, ref: Ref) -> None:
        tp, offset = ref
        self.pending.setdefault(tp, {})[offset] = False

    def done(self, ref: Ref | None) -> None:
        """The record at ``ref`` is handled: it may be committed once what it produced so far
        is delivered."""
        if ref is None:
            return
        tp, offset = ref
        pending = self.pending.get(tp)
        if pending is not None and offset in pending:
            pending[offset] = self.output.produced + 1

    def forget(self, tp: TP) -> None:
        self.pending.pop(tp, None)

    def commit(self, force: bool = False, revoking: bool = False) -> None:
        """Commit each partition up to its first offset that is not handled or whose outcomes
        and dead letters are not all confirmed delivered (delivery reports; ``force``: wait for
        all of them first, e.g. before letting go of partitions)."""
        output = self.output
        output.producer.poll(0)  # serves delivery reports
        if not force and time.monotonic() - self._last_commit < self.interval_s:
            return
        self._last_commit = time.monotonic()
        remaining = output.producer.flush(30) if force and output.undelivered else 0
        # The oldest record still undelivered: an offset whose stamp is above it waits.
        oldest = min(output.undelivered, default=output.produced + 1)
        offsets = []
        for (topic, partition), pending in self.pending.items():
            done_upto = None
            for offset in sorted(pending):
                stamp = pending[offset]
                if stamp is False or stamp > oldest:
                    break
                done_upto = offset
            if done_upto is not None:
                offsets.append(TopicPartition(topic, partition, done_upto + 1))
        if remaining or output.delivery_errors:
            errors = list(output.delivery_errors)
            output.delivery_errors.clear()  # in place: delivery callbacks hold these lists
            raise RuntimeError(
                f"could not deliver {remaining} outcome(s) or dead letter(s) "
                f"({'; '.join(errors[:3])}); stopping without committing so the decisions are "
                "redelivered"
            )
        if not offsets and not output.to_mark:
            return
        if output.to_mark:
            try:
                self.store.mark_emitted_many(output.to_mark)
                output.to_mark.clear()
            except self.redis_down:
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
            pending = self.pending.get((tp.topic, tp.partition), {})
            for offset in [o for o in pending if o < tp.offset]:
                del pending[offset]

    def sample_lag(self, settings: Settings) -> None:
        """Every 5 s, the consumer lag per partition, for the metrics (when they are served)."""
        if not settings.metrics_port or not self.consumer.assignment():
            return  # nobody scrapes: skip the broker round trips
        if time.monotonic() - self._last_lag < 5.0:
            return
        self._last_lag = time.monotonic()
        try:
            lags = metrics.confluent_consumer_lag(self.consumer, timeout=2.0)
        except Exception:  # noqa: BLE001 - a metrics sample must never stop sending
            log.debug("consumer lag sample failed", exc_info=True)
            return
        metrics.set_consumer_lag(settings.dispatcher_group, lags)
