"""CPU per clickstream event of the trigger worker's parts, in process (no broker, no Redis).

``python bench/_trigger_cost.py [--events N] [--users N] [--reps N] [--only NAMES]`` prints
``key=value`` lines, each the best of ``--reps`` CPU times per event over the same simulated records
(``processors.simulate.generate``, encoded in the wire format):

* ``decode_us``: ``Codec.decode`` alone: what the raw baseline of ``trigger_throughput.py`` pays
  per event besides librdkafka's ``consume``;
* ``intake_us``: ``streams.intake.intake`` (decode, validation, the ``ClickEvent``);
* ``engine_us``: ``Engine.on_event`` alone on the decoded events, states in a dict (as backtest);
* ``worker_us``: the worker's real batch path, ``streams.pipeline.Pipeline.process`` over batches
  of 2,000 records, with a checkpoint (``Checkpointer.take`` + ``write``: state encoding, the store
  applied) every ``--checkpoint-every`` records, the producer a no-op, under the worker's GC
  policy (its thresholds, the survivors frozen after each checkpoint);
* ``floor_us``: the same with ``Engine.on_event`` replaced by a stand-in that keeps an empty state:
  what the worker costs besides the engine and the engine's state;
* ``worker_checkpoint_us``, ``floor_checkpoint_us``: the part of the last replay's CPU spent in
  the checkpoints (taking the buffer, encoding the states, writing, applying to the store);
* ``engine_share``: ``1 - floor_us / worker_us``.

Why this exists (docs/performance.md "What bounds the ratio"): the throughput target compares
the worker with a loop whose cost is nearly all ``decode_us``, so these figures say which part
would have to shrink by how much. Not a benchmark of ``make bench`` (the leading underscore keeps
``bench/run.py`` from running it): it takes ~1-2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# appended: a compiled build on PYTHONPATH (make bench) comes first
sys.path.append(str(Path(__file__).resolve().parent.parent))

from processors.core.engine import Step, UserState  # noqa: E402
from processors.core.events import ClickEvent  # noqa: E402
from processors.settings import Settings  # noqa: E402
from processors.simulate import generate  # noqa: E402
from streams.intake import intake  # noqa: E402

BATCH = 2_000  # the worker's largest clickstream batch
PARTITIONS = 4  # a user's records on one partition (keyed by user_id), as on the topic


class Record:
    """What the worker reads of a confluent-kafka ``Message``."""

    __slots__ = ("_key", "_value", "_offset", "_partition")

    def __init__(self, key: bytes, value: bytes, offset: int, partition: int) -> None:
        self._key, self._value, self._offset, self._partition = key, value, offset, partition

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return self._offset

    def partition(self) -> int:
        return self._partition

    def headers(self) -> None:
        return None


class NullOutput:
    """The worker's producer, minus Kafka: everything is accepted and at once "delivered"."""

    def send(self, *args: Any, **kwargs: Any) -> None:
        return None

    def send_many(self, *args: Any) -> None:
        return None

    def barrier(self) -> int:
        return 0

    async def wait(self, barrier: int) -> None:
        return None

    async def flush(self) -> None:
        return None


class OwnedPartitions:
    """The clickstream reader's bookkeeping without its consumer."""

    def __init__(self) -> None:
        self.owned: set[int] = set()
        self.positions: dict[int, int | None] = {}

    def commit(self, positions: dict[int, int]) -> None:
        return None


class StandIn:
    """``Engine`` for ``floor_us``: keeps an (almost) empty state, decides nothing."""

    def on_event(self, state: UserState | None, event: ClickEvent, *_: Any) -> Step:
        st = state if state is not None else UserState(event.user_id)
        st.seq += 1
        if event.ts > st.max_ts:
            st.max_ts = event.ts
        step = Step(st)
        step.wake_at = st.max_ts + 1
        return step

    def on_time(self, state: UserState, watermark_ms: int) -> Step:
        return Step(state)


def best_cpu_us(run: Callable[[], object], events: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best / events * 1e6


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=8_000)
    parser.add_argument(
        "--only", default="", help="comma-separated figures to measure (default: all)"
    )
    args = parser.parse_args(None if argv is None else list(argv))

    from streams.worker import build

    settings = Settings.load(profile="dev", clock="event", worker_id="trigger-cost")
    app, shell = build(settings)  # builds no Kafka client: the parts below stand in for them
    codec = shell.codec
    clicks = list(generate(args.users, args.events, 0))
    records = [
        Record(key, codec.encode("ClickEvent", c.to_record()), i, zlib.crc32(key) % PARTITIONS)
        for i, c in enumerate(clicks)
        for key in (c.user_id.encode(),)
    ]
    shell.clients._output = NullOutput()  # type: ignore[assignment]
    reader = OwnedPartitions()
    shell.clients._reader = reader  # type: ignore[assignment]
    checkpointer = shell.clients.checkpointer
    store = checkpointer.store

    def reset() -> None:
        store.data.clear()
        shell.users.clear()
        reader.owned = set(range(PARTITIONS))
        reader.positions = dict.fromkeys(range(PARTITIONS), 0)

    spent = [0.0]  # CPU seconds in checkpoints during the last replay

    async def checkpoint() -> None:
        started = time.process_time()
        await checkpointer.checkpoint()
        gc.freeze()  # the worker's GcPolicy.settle() after each checkpoint is taken
        spent[0] += time.process_time() - started

    async def replay() -> None:
        since = 0
        spent[0] = 0.0
        for start in range(0, len(records), BATCH):
            await shell.pipeline.process(records[start : start + BATCH])  # type: ignore[arg-type]
            since += BATCH
            if since >= args.checkpoint_every:
                since = 0
                await checkpoint()
        await checkpoint()

    loop = asyncio.new_event_loop()

    def worker() -> None:
        reset()
        loop.run_until_complete(replay())

    decode = codec.decode
    values = [r.value() for r in records]

    def decode_all() -> None:
        for value in values:
            decode(value)

    def intake_all() -> None:
        for r in records:
            intake(codec, r.key(), r.value(), None)

    engine = shell.engine

    def engine_all() -> None:
        states: dict[str, UserState] = {}
        on_event = engine.on_event
        for click in clicks:
            step = on_event(states.get(click.user_id), click)
            if step.state is None:
                states.pop(click.user_id, None)
            else:
                states[click.user_id] = step.state

    try:
        from streams.gcpolicy import WORKER_GC_THRESHOLDS as thresholds
    except ImportError:  # a build from before ADR 42
        from processors.collector import GC_THRESHOLDS as thresholds

    gc.collect()
    gc.freeze()  # as the worker does after start-up (streams/gcpolicy.py)
    gc.set_threshold(*thresholds)
    n = len(records)
    only = set(filter(None, args.only.split(",")))
    runs = {"decode_us": decode_all, "intake_us": intake_all, "engine_us": engine_all}
    runs["worker_us"] = worker
    figures: dict[str, float] = {}
    for name, run in runs.items():
        if not only or name.removesuffix("_us") in only:
            figures[name] = best_cpu_us(run, n, args.reps)
            if name == "worker_us":
                figures["worker_checkpoint_us"] = spent[0] / n * 1e6
    decisions = shell.stats.decisions
    if not only or "floor" in only:
        shell.steps.engine = StandIn()
        try:
            figures["floor_us"] = best_cpu_us(worker, n, args.reps)
            figures["floor_checkpoint_us"] = spent[0] / n * 1e6
        finally:
            shell.steps.engine = engine
    for key, value in figures.items():
        print(f"{key}={value:.1f}")
    if "floor_us" in figures and "worker_us" in figures:
        print(f"engine_share={1 - figures['floor_us'] / figures['worker_us']:.2f}")
    print(f"events={n} decisions_per_replay={decisions // args.reps}")
    print(f"cache_hits={shell.users.cache.hits} cache_misses={shell.users.cache.misses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
