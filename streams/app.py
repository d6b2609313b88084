"""The Faust application of the trigger worker (settings only; agents live in streams.agents).

Spike findings (faust-streaming 0.15.3, aiokafka 0.14, tansu 0.6 with memory storage):

* Join: with ``broker_session_timeout=6`` / ``broker_heartbeat_interval=1`` a fresh worker
  processes its first record ~6 s after ``exec`` (imports ~1 s, group join + leader election
  ~3 s, table recovery); with Faust's defaults (60 s / 3 s) the same spike took ~32 s on tansu.
  ``nudgeflow worker`` in tests/test_streams_smoke.py: first state stored ~6 s after start.
  SIGTERM stops the worker cleanly in 1.3-3 s (mode's Worker handles SIGTERM/SIGINT itself:
  stops agents, flushes the producer, commits, leaves the group); ``execute_from_commandline``
  then raises ``SystemExit(0)``.
* Table: ``store="memory://"`` needs no rocksdb (python-rocksdb is not installed and not needed).
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
  per second for the whole group, not per worker.
* Programmatic start: ``faust.Worker(app, loglevel="warn", quiet=True).execute_from_commandline()``
  (``app.main()`` would re-parse ``sys.argv`` with Faust's own click CLI). Faust's loglevel
  takes ``warn``, not ``warning``. Faust's terminal spinner (on unless the level is below
  WARN) writes escape codes into logs and sets the root logger to DEBUG, so streams.worker
  turns it off.
"""

from __future__ import annotations

from typing import Any

import faust

from processors.settings import Settings


def broker_urls(bootstrap_servers: str) -> list[str]:
    """``host1:9092,host2:9092`` -> Faust broker URLs."""
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        raise ValueError("bootstrap_servers is empty; expected host:port[,host:port...]")
    return [f"kafka://{h}" for h in hosts]


def make_app(settings: Settings) -> faust.App:
    """A Faust app configured from ``settings``; the caller installs the agents.

    ``producer_acks=-1``: a decision or dead letter is only "sent" once every in-sync replica
    has it, because Faust commits the input offsets right after flushing the producer.
    """
    session_s = settings.session_timeout_ms / 1000
    web_port = settings.worker_web_port
    options: dict[str, Any] = {"web_enabled": web_port > 0}
    if web_port > 0:
        options["web_port"] = web_port
    return faust.App(
        settings.worker_id,
        broker=broker_urls(settings.bootstrap_servers),
        store="memory://",
        autodiscover=False,
        broker_session_timeout=session_s,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        broker_request_timeout=max(90.0, session_s + 30.0),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        worker_redirect_stdouts=False,
        **options,
    )
