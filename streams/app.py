"""The Faust application of the trigger worker (settings only; agents live in streams.agents).

Spike findings (faust-streaming 0.15.3, aiokafka 0.14, tansu 0.6 with memory storage):

* Join: with ``broker_session_timeout=6`` / ``broker_heartbeat_interval=1`` a fresh worker
  processes its first record ~6 s after ``exec`` (imports ~1 s, group join + leader election
  ~3 s, table recovery); with Faust's defaults (60 s / 3 s) the same spike took ~32 s on tansu.
  ``nudgeflow worker`` in tests/test_streams_smoke.py: first state stored ~6 s after start.
  SIGTERM stops the worker cleanly in 1.3-3 s (mode's Worker handles SIGTERM/SIGINT itself:
  stops agents, flushes the producer, commits, leaves the group); ``execute_from_commandline``
  then raises ``SystemExit(0)``.
* Table: the store is ``settings.worker_store``. ``memory://`` (dev profile) needs no RocksDB;
  ``rocksdb://`` (production default) uses faust-streaming's ``rocksdict`` driver (the
  ``rocksdict`` wheel; python-rocksdb is not installed), one RocksDB per table partition under
  Faust's data directory (``FAUST_DATADIR``, default ``<worker_id>-data`` in the working
  directory), and keeps the changelog offset it has applied, so a restart replays only the
  changelog tail. Verified on tansu: a worker restarted on the same data directory recovered its
  users' state and fired their timers.
  The table must be declared with ``key_type=bytes, value_type=bytes`` to get raw serializers:
  ``app.Table`` does not accept ``key_serializer``/``value_serializer``, and passing only a
  ``schema=`` leaves the table's own serializer at ``json``, so writes look fine but recovery
  fails with "Error in recovery Expecting value" warnings. With the memory store the whole
  changelog is replayed at every start (no persisted offsets): a restarted worker sees its
  state again (verified: a counter continued from its pre-restart value).
* Table writes are only allowed inside stream iteration; the changelog record goes to the
  partition of the *current event*, not the key's hash partition. So an agent on a
  co-partitioned topic (``nudgeflow-ticks``, same partition count) may read/write the keys of
  the partition it is processing. Faust's assignor gives partition p of both topics to the same
  worker (verified with two workers: each got clickstream {0,1}/{2,3} and ticks {0,1}/{2,3},
  and the handed-over partitions' state was recovered on the new owner).
* The memory store drops keys of partitions that are not assigned only for keys it *restored*
  from the changelog, not for keys written live, so after a rebalance ``table.items()`` may show
  keys of other workers' partitions: the worker filters by the partition stored in each value
  (streams.timers.pack_state).
* ``async for event in stream.events()`` gives ``event.key``/``event.value`` (raw bytes),
  ``event.message.partition`` and ``event.message.headers`` = a tuple of ``(str, bytes)`` pairs
  (empty tuple when there are none). ``topic.send(headers={"name": b"value"})`` works.
* ``web_port`` must be 1..65535 (``0`` is rejected), so port 0 means ``web_enabled=False``.
* ``@app.timer(interval, on_leader=True)`` runs only on the group leader: one tick per partition
  per interval (``streams.agents.TICK_INTERVAL_S``) for the whole group, not per worker.
* Programmatic start: ``faust.Worker(app, loglevel="warn", quiet=True).execute_from_commandline()``
  (``app.main()`` would re-parse ``sys.argv`` with Faust's own click CLI). Faust's loglevel
  takes ``warn``, not ``warning``. Faust's terminal spinner (on unless the level is below
  WARN) writes escape codes into logs and sets the root logger to DEBUG, so streams.worker
  turns it off.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.sensors import Monitor

from processors.settings import Settings

# Throughput settings (docs/performance.md has the measurements behind each one).
PRODUCER_LINGER_S = 0.005
"""Every event writes a changelog record; with Faust's default linger of 0 each one became its
own produce request and the socket writes alone took ~20% of the worker's CPU. 5 ms batches
them and adds at most 5 ms to a decision's latency."""
PRODUCER_MAX_BATCH_BYTES = 256 * 1024  # per partition; the default 16 KB holds ~18 states
STREAM_BUFFER_MAXSIZE = 16_384  # events prefetched per stream (Faust default 4096)
FETCH_MAX_WAIT_MS = 50
"""Longest a fetch may wait at the broker for data. Faust hard-codes 1500 ms; a broker that holds
a fetch for its full wait when little data is there (tansu does) then delays every event at low
rates: on the embedded stack, aiokafka's produce-to-consume latency was p50 364 ms with 1500
and 4 ms with 10. Idle partitions cost one empty fetch per 50 ms."""


def shorten_fetch_wait() -> None:
    """Make Faust's consumer use :data:`FETCH_MAX_WAIT_MS` (idempotent).

    Faust builds its aiokafka consumer in ``AIOKafkaConsumerThread._create_worker_consumer`` with
    a literal ``fetch_max_wait_ms=1500`` and offers no setting for it; aiokafka reads the value
    only when the consumer starts, so it is set on the new consumer right after it is built.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "_nudgeflow", False):
        return

    def create_worker_consumer(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumer = create(self, *args, **kwargs)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    create_worker_consumer._nudgeflow = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]


class QuietMonitor(Monitor):
    """Faust's stats monitor without its per-message bookkeeping.

    The default monitor updates a dozen counters and timestamps for every message, event, table
    access and send (~3% of the worker's CPU) to feed Faust's web stats page, which NudgeFlow does
    not use: its own Prometheus metrics (processors.metrics) are the operational view. Commit,
    rebalance and assignment hooks are kept.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_table_get(self, table: Any, key: Any) -> None:
        return None

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        return None

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int,
                          valsize: int) -> None:  # fmt: skip
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        return None


@dataclass
class WorkerHooks:
    """Coroutines run *before* Faust's own handling of a revoke or a stop.

    Why not Faust's ``on_partitions_revoked`` signal: Faust sends it after it has already
    revoked the table partitions (a RocksDB store closes their databases then), and on stop it
    stops the tables before ``on_before_shutdown``. The worker's last checkpoint
    (streams.checkpoint) must be written while the table is still open and before the group
    can hand the partitions to another worker.
    """

    before_revoke: list[Callable[[Any], Awaitable[None]]] = field(default_factory=list)
    before_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class WorkerApp(faust.App):
    """faust.App with :class:`WorkerHooks` (``app.nudgeflow_hooks``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nudgeflow_hooks = WorkerHooks()

    async def _on_partitions_revoked(self, revoked: Any) -> None:
        for hook in self.nudgeflow_hooks.before_revoke:
            await hook(revoked)
        await super()._on_partitions_revoked(revoked)

    async def on_stop(self) -> None:
        for stop in self.nudgeflow_hooks.before_stop:
            try:
                await stop()
            except Exception:
                self.log.exception("before-stop hook failed")
        await super().on_stop()


def broker_urls(bootstrap_servers: str) -> list[str]:
    """``host1:9092,host2:9092`` -> Faust broker URLs."""
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        raise ValueError("bootstrap_servers is empty; expected host:port[,host:port...]")
    return [f"kafka://{h}" for h in hosts]


STORES = ("memory://", "rocksdb://")


def check_store(url: str) -> str:
    """``settings.worker_store`` must name a store this worker can open; say why if not."""
    if not url.startswith(STORES):
        raise ValueError(f"worker store must start with one of {STORES}, got {url!r}")
    if url.startswith("rocksdb://"):
        try:
            import rocksdict  # noqa: F401
        except ImportError:
            raise ValueError(
                "worker store rocksdb:// needs the rocksdict package (pip install rocksdict), "
                "or set NUDGEFLOW_WORKER_STORE=memory://"
            ) from None
    return url


def make_app(settings: Settings) -> faust.App:
    """A Faust app configured from ``settings``; the caller installs the agents.

    ``producer_acks=-1``: a decision or dead letter is only "sent" once every in-sync replica
    has it, because Faust commits the input offsets right after flushing the producer.
    Raises ``ValueError`` for a store it cannot open. Shortens the consumer's fetch wait
    (:func:`shorten_fetch_wait`).
    """
    shorten_fetch_wait()
    session_s = settings.session_timeout_ms / 1000
    web_port = settings.worker_web_port
    options: dict[str, Any] = {"web_enabled": web_port > 0}
    if web_port > 0:
        options["web_port"] = web_port
    return WorkerApp(
        settings.worker_id,
        broker=broker_urls(settings.bootstrap_servers),
        store=check_store(settings.worker_store),
        autodiscover=False,
        broker_session_timeout=session_s,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        broker_request_timeout=max(90.0, session_s + 30.0),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        worker_redirect_stdouts=False,
        producer_linger=PRODUCER_LINGER_S,
        producer_max_batch_size=PRODUCER_MAX_BATCH_BYTES,
        stream_buffer_maxsize=STREAM_BUFFER_MAXSIZE,
        Monitor=QuietMonitor,
        **options,
    )
