"""The Faust application of the trigger worker (settings and hooks; the worker's parts are wired
onto it by :mod:`streams.agents`).

Why each setting is what it is, with the measurements: docs/adr/0001-faust-worker-app.md.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.sensors import Monitor

from processors.settings import Settings

# Throughput settings (docs/adr/0001-faust-worker-app.md).
PRODUCER_LINGER_S = 0.005  # Faust's producer batches for 5 ms: at most 5 ms added to a record
PRODUCER_MAX_BATCH_BYTES = 256 * 1024  # per partition; the default 16 KB holds ~18 states
STREAM_BUFFER_MAXSIZE = 16_384  # events prefetched per stream (Faust default 4096)


class QuietMonitor(Monitor):
    """Faust's stats monitor without its per-message bookkeeping (Faust's web stats page is not
    used; the Prometheus metrics of processors.metrics are the operational view). Commit,
    rebalance and assignment hooks are kept."""

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
    """Coroutines run *before* Faust's own handling of a revoke or a stop: while the table is
    still open and before the group can hand the partitions to another worker (the worker's
    last checkpoint, :mod:`streams.assignment`). Faust's own ``on_partitions_revoked`` signal
    comes too late for that (docs/adr/0001-faust-worker-app.md)."""

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


def membership_lost(app: faust.App) -> bool:
    """True when the group coordinator no longer knows this worker: its generation was reset
    after a heartbeat or commit was refused, so its partitions may already be another
    worker's (Kafka's "partitions lost", which aiokafka reports as an ordinary revoke)."""
    try:
        consumer = app.consumer._thread._consumer  # type: ignore[attr-defined]
        if consumer is None:
            return False
        return bool(consumer._coordinator.generation < 0)
    except AttributeError:  # not the aiokafka driver, or not started
        return False


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's view of the cluster security that ``Settings.kafka_common`` gives librdkafka."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol.endswith("SSL"):
        ca = settings.kafka_ssl_ca_location
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.kafka_sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password else None,
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=context,
    )


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
    Raises ``ValueError`` for a store it cannot open.
    """
    session_s = settings.session_timeout_ms / 1000
    web_port = settings.worker_web_port
    options: dict[str, Any] = {"web_enabled": web_port > 0}
    store = check_store(settings.worker_store)
    if store.startswith("memory:"):
        # Standby replicas only speed up a take-over from a store kept on disk; the memory store
        # drops what they read at every rebalance.
        options["table_standby_replicas"] = 0
    if web_port > 0:
        options["web_port"] = web_port
    return WorkerApp(
        settings.worker_id,
        broker=broker_urls(settings.bootstrap_servers),
        broker_credentials=broker_credentials(settings),
        store=store,
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
