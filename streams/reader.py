"""The clickstream reader: a confluent-kafka consumer that follows Faust's partition assignment.

Why not a Faust agent: Faust's per-message path (conductor, stream, event, ack, sensors) costs
~200 us per record here, while librdkafka hands over a batch of records for ~2 us each; the
trigger stage was 0.02x a raw consumer with it (docs/performance.md). So the worker reads the
clickstream in batches with this consumer and gives the batches to the engine, while Faust
keeps what it is good at: group membership and partition assignment (through the
co-partitioned ticks topic), the ``user_state`` table, its changelog recovery and standbys, and
the live clock's ticks.

How it follows Faust: the reader owns clickstream partition p exactly while this worker's Faust
consumer owns ticks partition p *and* the table's partition p is recovered. Faust announces
both moments: ``on_partitions_revoked`` (before anything moves: the worker checkpoints and the
reader lets go of every partition) and ``on_rebalance_complete`` (tables recovered: the reader
takes the ticks partitions it now has, each at the position stored in the table,
:mod:`streams.state.checkpoint`). The consumer never joins a group (``assign``, not ``subscribe``),
so two workers cannot both read a partition unless Faust gave it to both.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from processors.settings import Settings
from streams.output import SOCKET_TIMEOUT_MS

log = logging.getLogger(__name__)

BATCH_MAX = 5000  # records per consume() call
POLL_S = 0.05  # longest wait for a batch when the partitions are idle
FETCH_WAIT_MS = 10  # longest the broker holds a fetch for FETCH_MIN_BYTES (latency budget)
FETCH_MIN_BYTES = 1 << 20  # more than a live fetch gathers in FETCH_WAIT_MS: the wait decides


def offsets_group(worker_id: str) -> str:
    """The consumer group the reader commits to, for lag monitoring and autoscaling only."""
    return f"{worker_id}-clickstream"


class ClickstreamReader:
    """Batches of clickstream records from the partitions this worker owns."""

    def __init__(self, settings: Settings, *, client_id: str) -> None:
        self.topic = settings.topic_clickstream
        self._consumer = Consumer(
            {
                **settings.kafka_common(),
                "client.id": client_id,
                "group.id": offsets_group(settings.worker_id),
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "queued.max.messages.kbytes": 16 * 1024,  # prefetch bound: ~100k events, 16 MB
                # A fetch is answered once FETCH_MIN_BYTES are there or after FETCH_WAIT_MS:
                # live, one fetch per 10 ms instead of one per producer request (ADR 41).
                "fetch.min.bytes": FETCH_MIN_BYTES,
                "fetch.wait.max.ms": FETCH_WAIT_MS,
                "enable.partition.eof": False,
                "socket.timeout.ms": SOCKET_TIMEOUT_MS,  # streams.output: dead connections
                "socket.keepalive.enable": True,
            }
        )
        # Its own thread: a shared executor's other work must never delay a fetch (latency).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="clickstream")
        # And commits their own: librdkafka's asynchronous commit still blocks its caller for
        # as long as a fetch is in flight (~30 ms measured), which stalled the event loop.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="clickstream-commit")
        self.owned: set[int] = set()
        self.positions: dict[int, int | None] = {}
        """Next offset to read per owned partition (None: the beginning); the caller advances it."""
        self._closed = False

    def assign(self, positions: dict[int, int | None]) -> None:
        """Start reading ``partition -> offset`` (None: from the beginning)."""
        if not positions:
            return
        tps = [
            TopicPartition(self.topic, p, OFFSET_BEGINNING if off is None else off)
            for p, off in positions.items()
        ]
        self._consumer.incremental_assign(tps)
        self.owned.update(positions)
        self.positions.update(positions)
        log.info("reading clickstream partitions %s", sorted(positions))

    def release_all(self) -> None:
        """Stop reading every partition (records already fetched for them are dropped by the
        caller, which checks :attr:`owned`)."""
        if self.owned:
            self._consumer.incremental_unassign(
                [TopicPartition(self.topic, p) for p in sorted(self.owned)]
            )
            log.info("released clickstream partitions %s", sorted(self.owned))
        self.owned.clear()
        self.positions.clear()

    async def poll(self) -> list[Message]:
        """The next batch (possibly empty): the records already fetched, taken at once on the
        event loop's thread (one turn of the loop is given first), else the first record within
        :data:`POLL_S` plus what came with it, waited for in a thread so the loop keeps
        running."""
        if not self.owned or self._closed:
            await asyncio.sleep(POLL_S)
            return []
        await asyncio.sleep(0)  # the other tasks' turn (ticks, checkpoints, heartbeats)
        if self._closed:
            return []
        msgs: list[Message] = self._consumer.consume(BATCH_MAX, 0)  # never blocks
        if msgs:
            return msgs
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._wait)

    def _wait(self) -> list[Message]:
        """The first record within :data:`POLL_S` plus what came with it.

        ``consume(n, timeout)`` waits for all ``n`` records or the whole timeout, so a single
        blocking call would hold every record of a quiet stream for the full timeout.
        """
        consumer = self._consumer
        msgs: list[Message] = consumer.consume(1, POLL_S)
        if msgs:
            msgs += consumer.consume(BATCH_MAX - 1, 0)
        return msgs

    def commit(self, positions: dict[int, int]) -> None:
        """Report positions to the offsets group (monitoring only; errors are not fatal), from
        the committer thread: never blocks the caller."""
        tps = [TopicPartition(self.topic, p, off) for p, off in positions.items()]
        if tps and not self._closed:
            self._committer.submit(self._commit, tps)

    def _commit(self, tps: list[TopicPartition]) -> None:
        if self._closed:
            return
        try:
            self._consumer.commit(offsets=tps, asynchronous=True)
        except Exception as exc:  # e.g. broker away: the next checkpoint commits again
            log.debug("clickstream offsets not committed: %s", exc)

    def lag(self) -> dict[int, int]:
        """Records behind the log end, per owned partition (blocking: call from a thread)."""
        out: dict[int, int] = {}
        for p, pos in sorted(dict(self.positions).items()):  # a copy: the loop updates it
            try:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=2.0, cached=False
                )
            except Exception:
                continue
            out[p] = max(0, high - max(low, pos if pos is not None else low))
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._thread.shutdown(wait=True)
            self._committer.shutdown(wait=True)
            self._consumer.close()
