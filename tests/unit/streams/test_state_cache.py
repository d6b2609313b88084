"""The worker's decoded-state cache and deferred encoding (streams/state/cache.py, checkpoint.py).

What must hold: a cached state is served only while the table value it came from is still the
one read; a checkpoint encodes each changed user once, exactly as the state was when the
checkpoint was taken (later changes go to the next one); a step that fails half-way leaves the
user at the state of the last checkpoint, never at a half-changed one.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from processors.core.engine import UserState
from processors.core.events import ClickEvent
from processors.settings import Settings
from streams.output import Output
from streams.state.cache import LiveState, StateCache
from streams.state.checkpoint import Checkpointer
from streams.state.timers import pack_state, unpack_state

T0 = 1_710_325_412_000


def value_of(state: UserState, partition: int = 0, wake_at: int | None = None) -> bytes:
    return pack_state(partition, wake_at, state.to_bytes())


def test_cache_serves_a_state_only_for_the_value_it_was_decoded_from() -> None:
    cache = StateCache()
    s1 = UserState("u1", seq=1)
    v1 = value_of(s1)
    cache.put(b"u1", v1, s1)
    assert cache.state(b"u1", v1) is s1
    assert cache.state(b"u1", bytes(v1)) is s1  # equal bytes (e.g. read back from RocksDB)
    v2 = value_of(UserState("u1", seq=2))  # the table moved on (restore, another checkpoint)
    got = cache.state(b"u1", v2)
    assert got is not s1 and got is not None and got.seq == 2
    assert cache.state(b"u1", None) is None


def test_cache_is_bounded_and_keeps_the_most_recent_users() -> None:
    cache = StateCache(capacity=100)
    for i in range(1000):
        s = UserState(f"u{i}")
        cache.put(f"u{i}".encode(), value_of(s), s)
    assert 50 <= len(cache) <= 100
    last = UserState("u999")
    assert cache.state(b"u999", value_of(last)) is not None
    assert cache.hits == 1  # u999 is still cached


@pytest.fixture
def checkpointer(bootstrap: str) -> Iterator[tuple[Checkpointer, dict[bytes, bytes]]]:
    """A checkpointer whose producer points at the session broker (it sends nothing here)."""
    store: dict[bytes, bytes] = {}
    settings = Settings.load(profile="dev", bootstrap_servers=bootstrap)
    output = Output(settings, client_id="test-state-cache")
    yield Checkpointer(store, output, "changelog"), store


@pytest.fixture(autouse=True)
def _collect_clients() -> Iterator[None]:
    """Producers of a test's shell go with the test, not at some later collection."""
    yield
    gc.collect()


def test_a_checkpoint_encodes_each_user_once_as_it_was_when_taken(
    checkpointer: tuple[Checkpointer, dict[bytes, bytes]],
) -> None:
    ck, _store = checkpointer
    cache = StateCache()
    state = UserState("u1", seq=1)
    encodes = 0

    class Counted(LiveState):
        __slots__ = ()

        def encode(self) -> bytes:
            nonlocal encodes
            encodes += 1
            return super().encode()

    live = Counted(cache, b"u1", 0, state, 123, None)
    ck.put(0, b"u1", live)
    state.seq = 5  # more events for the same user before the checkpoint: still one entry
    assert ck.get(0, b"u1") is live
    taken = ck.take()
    assert taken is not None and encodes == 1
    written = taken[0][0][b"u1"]
    assert written is not None
    state.seq = 9  # after the take: not in this checkpoint
    stored = unpack_state(written)
    assert stored.wake_at == 123 and UserState.from_bytes(stored.state).seq == 5
    assert cache.state(b"u1", written) is state  # the cache learned the written value


def test_a_checkpoint_encoding_while_steps_go_on_writes_each_state_as_taken(
    checkpointer: tuple[Checkpointer, dict[bytes, bytes]],
) -> None:
    """The worker's checkpoints take the buffer without encoding it and encode it a chunk at a
    time while steps go on: a step that reads a taken state first encodes it, so the change it
    makes goes to the next checkpoint, never into this one."""
    import asyncio

    ck, store = checkpointer
    cache = StateCache()
    unchanged = UserState("u0", seq=2)
    store[b"u0"] = value_of(unchanged)
    ck.put(0, b"u0", LiveState(cache, b"u0", 0, unchanged, None, store[b"u0"]))
    states = {f"u{i}".encode(): UserState(f"u{i}", seq=1) for i in range(1, 600)}
    for key, state in states.items():
        ck.put(0, key, LiveState(cache, key, 0, state, None, None))
    taken = ck.take(encode=False)
    assert taken is not None
    raw = ck.get(0, b"u7")  # a step reads u7 before its chunk is encoded...
    assert isinstance(raw, bytes)
    state = cache.state(b"u7", raw)
    assert state is states[b"u7"]
    state.seq = 9  # ...and changes it in place
    ck.put(0, b"u7", LiveState(cache, b"u7", 0, state, None, raw))
    asyncio.run(ck.encode_taken(taken, chunk=100))
    written = taken[0][0]
    assert b"u0" not in written  # equal to the stored value: not written again
    assert len(written) == len(states)
    for value in written.values():
        assert isinstance(value, bytes)
        assert UserState.from_bytes(unpack_state(value).state).seq == 1
    live = ck.get(0, b"u7")
    assert isinstance(live, LiveState) and live.state.seq == 9  # the next checkpoint's


def test_a_state_equal_to_the_stored_one_is_not_written_again(
    checkpointer: tuple[Checkpointer, dict[bytes, bytes]],
) -> None:
    ck, store = checkpointer
    cache = StateCache()
    state = UserState("u1", seq=3)
    store[b"u1"] = value_of(state)
    ck.put(0, b"u1", LiveState(cache, b"u1", 0, state, None, store[b"u1"]))
    ck.put(0, b"u2", LiveState(cache, b"u2", 0, UserState("u2"), None, None))
    taken = ck.take()
    assert taken is not None and set(taken[0][0]) == {b"u2"}


def test_a_checkpoint_not_written_keeps_every_change_for_reads_and_the_next_one(
    checkpointer: tuple[Checkpointer, dict[bytes, bytes]],
) -> None:
    """A worker that learns its membership expired writes nothing, but keeps processing until
    the revoke: the changes it did not write must still be what it reads (a read of the older
    stored state would decide on a state that lost events)."""
    ck, store = checkpointer
    cache = StateCache()
    old = UserState("u1", seq=1)
    store[b"u1"] = value_of(old)
    state = UserState("u1", seq=4)
    ck.put(0, b"u1", LiveState(cache, b"u1", 0, state, None, store[b"u1"]))
    ck.advance(0, 40)
    taken = ck.take()
    assert taken is not None
    ck.put(0, b"u2", LiveState(cache, b"u2", 0, UserState("u2"), None, None))  # after the take
    ck.put_back(taken)
    raw = ck.get(0, b"u1")
    assert isinstance(raw, bytes) and raw != store[b"u1"]
    assert cache.state(b"u1", raw) is state  # the live object, not a decode of the old value
    again = ck.take()
    assert again is not None
    assert set(again[0][0]) == {b"u1", b"u2"} and again[1] == {0: 40}


def test_a_failed_step_puts_the_user_back_at_the_last_checkpoint(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, bootstrap: str
) -> None:
    from streams.worker import build

    settings = Settings.load(
        profile="dev",
        bootstrap_servers=bootstrap,
        clock="event",
        worker_id="test-state-cache",
        state_dir=str(tmp_path),
    )
    _app, shell = build(settings)
    store: dict[bytes, bytes] = {}
    shell.clients.checkpointer.store = store
    shell.clients.reader.owned.add(0)

    def click(eid: str, ts: int) -> ClickEvent:
        return ClickEvent(eid, "u1", "page_view", ts, "s1", {})

    def send(ev: ClickEvent, offset: int) -> Any:
        return shell.steps.on_click(ev, b"u1", b"raw", 0, offset)

    send(click("e1", T0), 0)
    taken = shell.clients.checkpointer.take()  # a checkpoint: e1 is in the store
    assert taken is not None
    store.update({k: v for k, v in taken[0][0].items() if v is not None})
    shell.clients.checkpointer._writing = {}
    send(click("e2", T0 + 1000), 1)  # applied, not yet checkpointed

    real = shell.engine.on_event

    def half_then_fail(state: UserState | None, event: ClickEvent) -> Any:
        assert state is not None
        state.seen[event.event_id] = event.ts  # changed in place, then a bug
        raise RuntimeError("engine bug")

    monkeypatch.setattr(shell.engine, "on_event", half_then_fail)
    out = send(click("e3", T0 + 2000), 2)
    assert [(o.kind, o.label) for o in out] == [("dead_letter", "internal_error")]
    monkeypatch.setattr(shell.engine, "on_event", real)

    raw = shell.clients.checkpointer.get(0, b"u1")
    assert isinstance(raw, bytes)  # the last checkpoint's value, not the live object
    state = shell.users.load(b"u1", raw)
    assert state is not None and set(state.seen) == {"e1"}
    send(click("e3", T0 + 2000), 3)  # the next event starts from there
    state = shell.users.load(b"u1", shell.clients.checkpointer.get(0, b"u1"))
    assert state is not None and set(state.seen) == {"e1", "e3"}
    shell.clients.close()  # the reader stops; what the producer holds is delivered
    # The Faust app keeps the shell: drop its producer (the steps hold the checkpointer too).
    shell.clients._output = shell.clients._checkpointer = None
    shell.steps._checkpointer = None
