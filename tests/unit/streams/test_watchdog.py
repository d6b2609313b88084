"""The worker's liveness watchdog: a stalled event loop or a rebalance that does not move ends
the process (its supervisor restarts it); a long recovery that moves does not."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable

import faust
import pytest
from faust.types import TP

from streams import watchdog
from streams.watchdog import EXIT_STALLED, Stall, Watchdog, faust_progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_without_progress_for_the_limit_is_a_stall() -> None:
    stall = Stall(limit_s=60)
    assert not stall.observe(0, busy=True, progress=(1, 100))
    assert not stall.observe(59, busy=True, progress=(1, 100))
    assert stall.observe(60, busy=True, progress=(1, 100))


def test_progress_or_an_ended_rebalance_starts_the_count_again() -> None:
    stall = Stall(limit_s=60)
    stall.observe(0, busy=True, progress=(1, 100))
    assert not stall.observe(50, busy=True, progress=(1, 900))  # the recovery read on
    assert not stall.observe(100, busy=True, progress=(1, 900))
    assert not stall.observe(105, busy=False, progress=(1, 900))  # the rebalance ended
    assert not stall.observe(150, busy=True, progress=(2, 900))
    assert stall.observe(210, busy=True, progress=(2, 900))


def _watchdog(clock: Clock, state: dict[str, tuple[bool, Hashable]]) -> Watchdog:
    return Watchdog(
        None, 90, clock=clock, exit=lambda code: None, progress=lambda app: state["now"]
    )


def test_a_loop_that_stopped_beating_is_reported() -> None:
    clock, state = Clock(), {"now": (False, (0,))}
    dog = _watchdog(clock, state)
    asyncio.run(dog.beat())
    dog.stop()
    clock.now = 89
    assert dog.check() is None
    clock.now = 91
    assert "event loop" in (dog.check() or "")


def test_a_rebalance_that_does_not_move_is_reported_and_one_that_moves_is_not() -> None:
    clock, state = Clock(), {"now": (True, (3, 0, 0))}
    dog = _watchdog(clock, state)
    for t in range(0, 200, 5):  # the loop keeps beating; the recovery reads on
        clock.now = t
        asyncio.run(dog.beat())
        state["now"] = (True, (3, t * 100, 0))
        assert dog.check() is None
    dog.stop()
    for t in range(200, 300, 5):  # stuck: same rebalance, same offsets
        clock.now = t
        asyncio.run(dog.beat())
        why = dog.check()
        if t - 195 >= 90:  # offsets last moved at the look at 195
            assert why is not None and "rebalance" in why
        else:
            assert why is None


def test_the_thread_exits_the_process_when_the_loop_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "CHECK_INTERVAL_S", 0.02)
    exited: list[int] = []
    done = threading.Event()

    def exit_(code: int) -> None:
        exited.append(code)
        done.set()

    dog = Watchdog(None, 0.2, exit=exit_, progress=lambda app: (False, ()))
    asyncio.run(dog.beat())  # one beat, then the "loop" never runs again
    assert done.wait(10), "the watchdog never fired"
    assert exited == [EXIT_STALLED]


def test_disabled_with_a_zero_limit() -> None:
    dog = Watchdog(None, 0, exit=lambda code: pytest.fail("exited"))
    asyncio.run(dog.beat())
    assert dog._thread is None


def test_reads_faust_rebalance_state() -> None:
    app = faust.App("watchdog-test", broker="kafka://127.0.0.1:9", store="memory://")
    busy, progress = faust_progress(app)
    assert not busy
    app.rebalancing = True
    busy, again = faust_progress(app)
    assert busy and again == progress
    app.rebalancing_count += 1
    assert faust_progress(app)[1] != progress
    # Faust keeps None for a changelog partition whose recovery has not read anything yet
    recovery = app.tables.recovery
    recovery.active_offsets[TP("t-changelog", 0)] = None
    recovery.active_offsets[TP("t-changelog", 1)] = 41
    recovery.in_recovery = True
    busy, moved = faust_progress(app)
    assert busy and moved[1] == 41
    recovery.active_offsets[TP("t-changelog", 0)] = 7
    assert faust_progress(app)[1][1] == 48


def test_a_worker_the_group_no_longer_knows_is_busy_until_it_is_back() -> None:
    """After a broker restart expired its membership, a rejoin that never completes is a
    stall like a rebalance that does not move (the worker logged 'partitions lost' and was
    never assigned again)."""
    app = faust.App("watchdog-test", broker="kafka://127.0.0.1:9", store="memory://")
    out = {"lost": True}
    busy, progress = faust_progress(app, lost=lambda a: out["lost"])
    assert busy
    clock = Clock()
    dog = Watchdog(app, 90, clock=clock, exit=lambda code: None,
                   progress=lambda a: faust_progress(a, lost=lambda _: out["lost"]))  # fmt: skip
    for t in range(0, 100, 5):
        clock.now = t
        asyncio.run(dog.beat())
        why = dog.check()
        assert (why is not None) == (t >= 90), (t, why)
    assert why is not None and "rejoin" in why
    out["lost"] = False
    assert dog.check() is None and not faust_progress(app, lost=lambda a: False)[0]
    dog.stop()


def test_a_check_that_raises_does_not_end_the_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchdog, "CHECK_INTERVAL_S", 0.02)
    looks: list[int] = []
    done = threading.Event()

    def progress(app: object) -> tuple[bool, Hashable]:
        looks.append(1)
        if len(looks) < 3:
            raise TypeError("a half-built recovery")
        return True, ("stuck",)

    dog = Watchdog(None, 0.1, exit=lambda code: done.set(), progress=progress)
    asyncio.run(dog.beat())
    assert done.wait(10), "the watchdog died with its first failed check"
