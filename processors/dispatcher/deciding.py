"""The one decision path: the policy for consecutive decisions, in batches of two Redis script
calls each (``prepare_many``: reservation and reads; ``settle_many``: outcome records and atomic
cap checks, in order), so one user's decisions in a batch see each other's cap reservations
exactly as they would one at a time.

The batch size is the only difference between the clocks: live, up to :data:`BATCH_MAX`
decisions at the wall clock's time, pipelined (a batch's settle and the next batch's reads go
to Redis together, and Redis runs them while the previous batch's outcomes are published);
event clock (replays), one at a time at each decision's time, so the deferred sends due by then
are released before it (``now_of``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from processors.core.policy import CapCheck, Final, Pending, Policy, Step
from processors.dispatcher.inbox import Item
from processors.redis import RedisStore, SentBatch

BATCH_MAX = 128
"""Most decisions decided together (live clock): one Lua script call per phase, so Redis is
busy with one batch for a few milliseconds at most."""


class Settled:
    """A batch of decisions whose settle step has run, up to its cut."""

    __slots__ = ("items", "pending", "results", "cut", "passes")

    def __init__(
        self,
        items: list[Item],
        pending: list[Pending],
        results: list[tuple[int | None, bool]],
    ) -> None:
        self.items, self.pending, self.results = items, pending, results
        self.cut = len(items)
        self.passes = 0  # cap checks that passed with a reservation: texts to send
        ran = 0
        for i, p in enumerate(pending):
            if not isinstance(p, (Final, CapCheck)):
                continue
            if ran == len(results):  # the settle step stopped at the room-th send
                self.cut = i
                break
            if isinstance(p, CapCheck) and p.reserve and results[ran][0] is None:
                self.passes += 1
            ran += 1


class Decider:
    """Decides the decisions at the head of a queue; each leaves the queue once handled."""

    def __init__(self, policy: Policy, store: RedisStore, *, event_clock: bool) -> None:
        self.policy = policy
        self.store = store
        self.event_clock = event_clock
        self.batch_size = 1 if event_clock else BATCH_MAX

    def decide(
        self,
        queue: deque[Item],
        run: list[Item],
        room: Callable[[], int],
        now_of: Callable[[Item], int],
        handle: Callable[[Step, Item], None],
    ) -> None:
        """Decide ``run`` (the decisions at the head of ``queue``): ``now_of`` gives a batch's
        time (from its first item), ``handle`` takes each decision's step as it leaves the
        queue, ``room()`` is how many more sends may start.

        Pipelined on one connection, without a helper thread: once a batch's policy is done up
        to the cap checks, its settle and the next batch's prepare are written to Redis together
        (:meth:`RedisStore.send_batch`), and while Redis runs them the previous batch is
        handled here; then their replies are read. The store calls that follow a passed cap
        check with a reservation (a text to send: first-text claim, release of the caps of a
        text that cannot be rendered) must come before the next batch's cap checks, so a batch
        with such a pass is handled before the next batch's settle is sent (sends are rare next
        to suppressions); other single calls (deferral, final records of quiet-hours drops) may
        come after the next batch's reservations, as within one batch.

        A batch's settle step stops after the ``room``-th text to send; the decisions after it
        stay in the queue, reserved with their attempt's token, and the next call prepares them
        again with that token (the store knows it as its own attempt, not a busy one). On an
        error every decision not yet handled stays in the queue (reserved, maybe settled: a
        retry re-publishes a recorded outcome, see ``PolicySteps.start``)."""
        policy, store, size = self.policy, self.store, self.batch_size
        for item in run:
            if item.token is None:
                item.token = policy.token()
        chunks = [run[i : i + size] for i in range(0, len(run), size)]
        tokens = [[(item.payload, item.token or "") for item in chunk] for chunk in chunks]
        if room() <= 0:
            return  # the rest waits its turn
        pipelined = not self.event_clock
        reads = store.prepare_many(tokens[0]) if pipelined else None
        ready: Settled | None = None  # settled, not yet handled
        sent: SentBatch | None = None
        try:
            for k, chunk in enumerate(chunks):
                now = now_of(chunk[0])
                if reads is None:  # event clock: the reads as of this decision's time
                    reads = store.prepare_many(tokens[k], as_of=now)
                pending = [
                    policy.steps.start(d, now, token, prior, prefetched)
                    for (d, token), (prior, prefetched) in zip(tokens[k], reads, strict=True)
                ]
                to_settle = [p for p in pending if isinstance(p, (Final, CapCheck))]
                if ready is not None and ready.passes:
                    self._handle(ready, queue, handle)  # its sends' store calls come first
                    ready = None
                most = room()
                if most <= 0:
                    break  # the rest waits its turn (reserved, prepared again later)
                after = tokens[k + 1] if pipelined and k + 1 < len(chunks) else []
                sent = store.send_batch(to_settle, most, after)
                if ready is not None:
                    self._handle(ready, queue, handle)  # while Redis works
                    ready = None
                results, next_reads = sent.result()
                sent = None
                reads = next_reads if after else None
                ready = Settled(chunk, pending, results)
                if ready.cut < len(chunk):
                    break  # stopped at the room-th send
            if ready is not None:
                self._handle(ready, queue, handle)
        finally:
            if sent is not None:
                sent.discard()  # an error above: the replies are not needed (see the doc)

    def _handle(
        self, batch: Settled, queue: deque[Item], handle: Callable[[Step, Item], None]
    ) -> None:
        """Each decision of a settled batch (up to its cut) leaves the queue as handled."""
        policy = self.policy
        settled = iter(batch.results)
        for item, p in zip(batch.items[: batch.cut], batch.pending, strict=False):
            violated, recorded = (
                next(settled) if isinstance(p, (Final, CapCheck)) else (None, False)
            )
            # A passed cap check continues here with single calls; a Redis error leaves this
            # item (and the rest) in the queue, and a retry finds its state as it was left.
            step = policy.settled(p, violated, recorded)
            queue.popleft()
            handle(step, item)
