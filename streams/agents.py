"""The trigger worker's wiring: its parts, and what it registers on the Faust app.

All trigger logic is in :class:`processors.core.engine.Engine`; the worker moves records in
and out of it, one job per module:

* :mod:`streams.pipeline`: the read loop, clickstream batches -> :mod:`streams.intake` ->
  :mod:`streams.steps` (one user's step through the engine) -> :mod:`streams.emit` (decisions,
  cancellations, dead letters) -> :mod:`streams.output` (the one producer);
* :mod:`streams.state`: users' states through a write-back buffer and checkpoints that write
  states and clickstream positions together to the table's changelog, the decoded-state cache,
  the timer index;
* :mod:`streams.ticks`: time (ticks with the live clock, end-of-input flushes);
* :mod:`streams.assignment`: rebalances (the reader follows Faust's assignment);
* :mod:`streams.episodes` and :mod:`streams.lag`: the worker's gauges.

Faust provides group membership and partition assignment (the ticks topic), the table and its
changelog recovery, the ticks and the web server; the per-record path is ours because Faust's
costs ~200 us per record (docs/adr/0001-faust-worker-app.md).

Concurrency: the read loop, the ticks agent and the rebalance handlers are asyncio tasks over
the same state; each holds :attr:`TriggerShell.busy` while it touches state, so they never
interleave.

Delivery is at least once: after a crash the worker resumes each partition at its last
checkpoint, so a few events may be applied again, which the engine de-duplicates by
``event_id``; decision ids are deterministic, so the dispatcher sends each at most once.
"""

from __future__ import annotations

import asyncio
import logging

import faust

from processors import metrics
from processors.core.campaign import CampaignSet
from processors.core.clock import Clock, SystemClock
from processors.core.engine import Engine
from processors.settings import Settings
from schemas.codec import Codec
from streams.assignment import RECONCILE_INTERVAL_S, Assignment
from streams.clients import Clients
from streams.emit import Emitter
from streams.episodes import Episodes
from streams.lag import LAG_INTERVAL_S, Lag
from streams.pipeline import Pipeline
from streams.state.users import UserStates
from streams.state.writer import CheckpointWriter
from streams.stats import WorkerStats
from streams.steps import Steps
from streams.ticks import TICK_INTERVAL_S, Ticks
from streams.topics import Topics, make_topics
from streams.watchdog import BEAT_INTERVAL_S, Watchdog

log = logging.getLogger(__name__)


class TriggerShell:
    """The parts of one worker, wired to each other and to the Faust app."""

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
        self.live = settings.clock == "live"
        self.topics: Topics = make_topics(app, settings)
        self.table = app.Table(
            "user_state",
            partitions=settings.partitions,
            key_type=bytes,  # bytes -> Faust's raw serializer (see streams.app)
            value_type=bytes,
            help="engine state per user: "
            "streams.state.timers.pack_state(partition, wake_at, state)",
        )
        self.clients = Clients(settings, self.table)
        self.stats = WorkerStats()
        self.vocabulary = frozenset(engine.event_types)  # event types some enabled campaign reads
        self.campaign_ids = frozenset(engine.campaign_ids)
        for campaign_id in self.campaign_ids:
            metrics.CAMPAIGN_ENABLED.labels(campaign_id).set(1)
        self.episodes = Episodes(self.campaign_ids)
        # Event clock: only the end-of-input flush reads the timer index (all its users).
        self.users = UserStates(
            self.clients, self.episodes, cache_users=settings.state_cache_users, ordered=self.live
        )
        self.busy = asyncio.Lock()
        self.emitter = Emitter(settings, codec, self.clients, self.stats, self.clock)
        self.steps = Steps(
            engine, self.users, self.episodes, self.emitter, self.clients, self.stats
        )
        self.ticks = Ticks(
            settings,
            self.clients,
            self.users,
            self.steps,
            self.emitter,
            self.busy,
            self.stats,
            self.clock,
        )
        self.writer = CheckpointWriter(
            app, self.clients, settings.worker_checkpoint_interval_ms / 1000, self._fail
        )
        self.pipeline = Pipeline(
            codec,
            self.clients,
            self.steps,
            self.emitter,
            self.ticks,
            self.writer,
            self.busy,
            self.stats,
            self.vocabulary,
            self._fail,
        )
        self.assignment = Assignment(
            app, settings, self.clients, self.users, self.episodes, self.writer, self.busy
        )
        self.lag = Lag(settings, self.clients)

        # Ticks: a Faust agent in both clocks (the ticks topic carries the assignment); the
        # event clock ignores tick values.
        app.agent(self.topics.ticks, name="nudgeflow.ticks")(self.ticks.agent)
        if self.live:
            app.timer(TICK_INTERVAL_S, on_leader=True, name="nudgeflow.send_ticks")(self.ticks.send)
        app.timer(LAG_INTERVAL_S, name="nudgeflow.consumer_lag")(self.lag.sample)
        app.timer(RECONCILE_INTERVAL_S, name="nudgeflow.reconcile")(self.assignment.reconcile)
        self.watchdog = Watchdog(app, settings.worker_stall_timeout_s)
        app.timer(BEAT_INTERVAL_S, name="nudgeflow.watchdog")(self.watchdog.beat)
        pipeline = self.pipeline

        async def read() -> None:  # a plain function: Faust reads the signature of a task,
            await pipeline.run()  # which a compiled method does not have

        app.task(read)
        app.on_rebalance_complete.connect(self.assignment.on_rebalance_complete)  # type: ignore[arg-type]
        hooks = getattr(app, "nudgeflow_hooks", None)
        if hooks is not None:  # streams.app.WorkerApp: run before Faust's own revoke/stop
            hooks.before_revoke.append(self.assignment.before_revoke)
            hooks.before_stop.append(self._before_stop)
        else:
            app.on_partitions_revoked.connect(self.assignment.on_revoked_signal)  # type: ignore[arg-type]

    async def _fail(self, exc: BaseException) -> None:
        """The output refused a record or the state cannot be written: stop the worker (it
        restarts from its last checkpoint) rather than go on with a gap."""
        log.critical("trigger worker stops: %s: %s", type(exc).__name__, exc)
        self.pipeline.running = False
        await self.app.crash(exc)

    async def _before_stop(self) -> None:
        """Worker stopping: stop reading, write the last checkpoint, close the clients."""
        self.watchdog.stop()
        await self.pipeline.stop()
        await self.assignment.before_revoke()
        self.clients.close()


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
        state_ttl_ms=int(settings.state_ttl_s * 1000),
        # Lazy commits decide which tick wakes a quiet tail; the event clock has no ticks (the
        # end-of-input flush commits every tail), where they only cost a tail scan per event.
        lazy_commit=live,
    )
    return TriggerShell(app, settings, engine, codec or Codec(settings.schema_registry_url))
