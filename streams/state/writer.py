"""When checkpoints are written (:mod:`streams.state.checkpoint` says what one writes).

One at a time, in the background while the next batches are processed: every
``settings.worker_checkpoint_interval_ms``, or sooner once :data:`CHECKPOINT_MAX_PENDING` user
states wait in the buffer (then the read loop also waits for the one being written: memory
stays bounded). A whole one, with processing stopped, before a rebalance lets partitions go.
None once the group has expired this worker's membership: its partitions may already be
another worker's, so the unwritten changes are dropped (:meth:`CheckpointWriter.drop_unwritten`)
and the partitions' next owner replays their input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from processors import metrics
from streams.app import membership_lost
from streams.clients import Clients

log = logging.getLogger(__name__)

CHECKPOINT_MAX_PENDING = 20_000  # live states (~6 KB each) buffered before a forced checkpoint


class CheckpointWriter:
    """Starts checkpoints and waits for them (the caller holds the worker's lock to start one)."""

    def __init__(
        self,
        app: faust.App,
        clients: Clients,
        interval_s: float,
        fail: Callable[[BaseException], Awaitable[None]],
    ) -> None:
        """``fail``: stops the worker when a checkpoint cannot be written."""
        self.app = app
        self.clients = clients
        self.interval_s = interval_s
        self.fail = fail
        self._last = time.monotonic()
        self._writer: asyncio.Future[None] | None = None

    def full(self) -> bool:
        """Enough user states wait that a checkpoint must be written before more are read."""
        return self.clients.checkpointer.pending() >= CHECKPOINT_MAX_PENDING

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s or self.full()

    def start(self) -> None:
        """Take the buffer and write it in the background (at most one checkpoint at a time)."""
        if self._writer is not None and not self._writer.done():
            return
        taken = self.clients.checkpointer.take(encode=False)  # encoded while steps go on
        self._last = time.monotonic()
        if taken is not None:
            self._writer = asyncio.ensure_future(self._write(taken))

    async def _write(self, taken: Any) -> None:
        started = time.monotonic()
        checkpointer = self.clients.checkpointer
        if membership_lost(self.app):
            # The partitions may belong to another worker already: write nothing, keep the
            # changes buffered (processing goes on with them until the revoke drops them all).
            checkpointer.put_back(taken)
            return
        try:
            positions = await checkpointer.write(taken)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.fail(exc)
            return
        metrics.CHECKPOINT.observe(time.monotonic() - started)
        if positions and self.clients.reading:
            self.clients.reader.commit(positions)

    async def finish(self) -> None:
        """Wait for the checkpoint being written, if any."""
        writer = self._writer
        if writer is not None:
            self._writer = None
            await writer

    async def now(self) -> None:
        """A whole checkpoint with processing stopped (the caller holds the worker's lock)."""
        await self.finish()
        self.start()
        await self.finish()

    async def drop_unwritten(self, why: str) -> None:
        """Forget the changes no checkpoint has written yet, the one being written included
        (the partitions were lost: module docstring)."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            try:
                await writer
            except BaseException:
                pass
        checkpointer = self.clients.checkpointer
        dropped = checkpointer.pending()
        checkpointer.forget()
        log.warning(
            "partitions lost (%s): %d unwritten state change(s) dropped; their input is"
            " replayed by the partitions' next owner",
            why,
            dropped,
        )
