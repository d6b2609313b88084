"""Which clickstream partitions this worker reads, following Faust's assignment.

The reader owns clickstream partition p exactly while Faust gives this worker ticks partition p
(co-partitioned) and the table's partition p is recovered:

* before Faust revokes (:meth:`Assignment.before_revoke`, a :class:`streams.app.WorkerHooks`
  hook): write a whole checkpoint, then let go of every partition (Faust's eager rebalance
  revokes them all); partitions *lost* to an expired membership are not written at all
  (:class:`streams.state.writer.CheckpointWriter`);
* once the rebalance is complete, tables recovered (:meth:`Assignment.on_rebalance_complete`):
  take the ticks partitions now assigned whose tables that recovery restored, each at the
  position stored in the table;
* as a safety net (:meth:`Assignment.reconcile`), re-take the right partitions when what is
  read and what Faust assigned differ for a while outside a rebalance.

Timer index, decoded states and the open-episodes gauge are dropped at each change and rebuilt
from the table on first use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import faust

from processors.settings import Settings
from streams.app import membership_lost
from streams.clients import Clients
from streams.episodes import Episodes
from streams.state.users import UserStates
from streams.state.writer import CheckpointWriter

log = logging.getLogger(__name__)
STATUS_LOGGER = "nudgeflow.worker"
status = logging.getLogger(STATUS_LOGGER)
"""The worker's few status lines (start, assignment changes): shown at the default log level
by ``nudgeflow worker``; never a user id, number or text, never one per event."""

RECONCILE_INTERVAL_S = 2.0  # how often the read partitions are checked against Faust's
RECONCILE_AFTER_S = 6.0  # a mismatch this long outside a rebalance is not a rebalance in flight
REVOKE_CHECKPOINT_S = 30.0  # longest a rebalance waits for the worker's last checkpoint
EXIT_CHECKPOINT_FAILED = 75  # EX_TEMPFAIL: a supervisor restarts the worker


class Assignment:
    """Rebalance handling of one worker (every handler holds the worker's lock)."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        clients: Clients,
        users: UserStates,
        episodes: Episodes,
        writer: CheckpointWriter,
        busy: asyncio.Lock,
    ) -> None:
        self.app = app
        self.settings = settings
        self.clients = clients
        self.users = users
        self.episodes = episodes
        self.writer = writer
        self.busy = busy
        self._mismatch_since: float | None = None
        self._announced: frozenset[int] | None = None  # partitions last reported as assigned

    def _restored(self) -> set[int] | None:
        """Partitions whose table Faust's last recovery restored (None while a newer recovery
        is pending). Faust signals a completed recovery before it checks that no newer
        generation has started, and then drops the keys of every other partition from a
        memory store: only these partitions can be read from the table now."""
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        if recovery.signal_recovery_start.is_set():
            return None
        topic = self.clients.table.changelog_topic.get_topic_name()
        return {tp.partition for tp in recovery.active_tps if tp.topic == topic}

    def _assigned(self) -> set[int] | None:
        """The ticks partitions Faust gave this worker whose tables are restored (None: the
        assignment cannot be read now)."""
        try:
            assigned = self.app.consumer.assignment()
        except Exception:
            return None
        restored = self._restored()
        if restored is None:
            return None
        ticks = self.settings.topic_ticks
        return {tp.partition for tp in assigned if tp.topic == ticks} & restored

    async def on_rebalance_complete(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        """Tables recovered: read the clickstream partitions of :meth:`_assigned`, each from
        the position stored in the table."""
        async with self.busy:
            mine = self._assigned()
            if mine is None:
                return
            reader, clients = self.clients.reader, self.clients
            gone = reader.owned - mine
            if gone:  # missed a revoke (should not happen): nothing of theirs is written
                reader.release_all()
                clients.checkpointer.drop(gone)
            new = mine - reader.owned
            positions = {p: clients.checkpointer.position(p) for p in sorted(new)}
            self.users.clear()
            self.episodes.clear()
            reader.assign(positions)
            for p, off in positions.items():
                log.info("clickstream partition %d resumes at %s", p, off or "the beginning")
            if mine != self._announced:  # one line per change (an eager rebalance gives back)
                self._announced = frozenset(mine)
                status.info("assigned partitions %s", sorted(mine))

    async def before_revoke(self, revoked: Any = None) -> None:
        """Faust is about to give partitions away: write everything, then let go of them all
        (the complete handler takes back what stays ours, at the position just written).

        Partitions *lost* (the group expired this worker, e.g. after a stall or an outage
        longer than the session timeout) may already belong to another worker, which restored
        them from the last checkpoint: nothing more is written for them (a late state would
        land after that worker's position records and put its position ahead of the state);
        the unwritten changes are dropped and the new owner replays their input."""
        async with self.busy:
            if self.clients.checkpointing:
                if membership_lost(self.app):
                    await self.writer.drop_unwritten("its group membership expired")
                else:
                    try:
                        await asyncio.wait_for(self.writer.now(), REVOKE_CHECKPOINT_S)
                    except Exception as exc:
                        # Letting the partitions go with a checkpoint that may still land
                        # later could put stale states after the next owner's: stop instead
                        # (the restart resumes from the last position written).
                        log.critical(
                            "last checkpoint before a rebalance failed (%s); the worker exits",
                            type(exc).__name__,
                        )
                        os._exit(EXIT_CHECKPOINT_FAILED)
                self.clients.checkpointer.forget()
            if self.clients.reading:
                self.clients.reader.release_all()
            self.users.clear()
            self.episodes.clear()

    async def on_revoked_signal(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        """Faust's own revoke signal, for an app without :class:`streams.app.WorkerHooks`."""
        await self.before_revoke()

    async def reconcile(self) -> None:
        """Safety net: the clickstream partitions read must be the ticks partitions Faust gave
        this worker. If they differ for :data:`RECONCILE_AFTER_S` outside a rebalance (a
        rebalance-complete signal that never came, e.g. after a broker outage), write a
        checkpoint, let go of everything and take the right partitions at their positions."""
        if (
            not self.clients.reading
            or self.app.rebalancing
            or getattr(self.app, "in_recovery", False)
        ):
            self._mismatch_since = None
            return
        mine = self._assigned()
        reader = self.clients.reader
        if mine is None or mine == reader.owned:
            self._mismatch_since = None
            return
        now = time.monotonic()
        if self._mismatch_since is None:
            self._mismatch_since = now
            return
        if now - self._mismatch_since < RECONCILE_AFTER_S:
            return
        log.warning(
            "reading clickstream partitions %s but Faust assigned ticks partitions %s for %.0f s:"
            " re-taking them from the checkpointed positions",
            sorted(reader.owned),
            sorted(mine),
            now - self._mismatch_since,
        )
        self._mismatch_since = None
        await self.before_revoke()
        await self.on_rebalance_complete(None)
