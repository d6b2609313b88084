"""The engine's per-user state bytes (the ``user_state`` table and its changelog).

A rolling upgrade reads values written by older versions, so every format ``to_bytes`` ever
wrote must keep decoding to the same state; anything unreadable must raise ``StateFormatError``
(a ``ValueError``), which the worker treats as bad data rather than crashing on it later.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import cramjam
import msgpack
import orjson
import pytest

from processors.core.campaign import load_campaigns, parse_campaigns
from processors.core.engine import (
    COMPRESS_MIN,
    FLUSH_MS,
    Engine,
    StateFormatError,
    UserState,
)
from processors.core.events import ClickEvent
from streams.state.timers import unpack_state

T0 = 1_710_325_412_000
S, M = 1_000, 60_000
CAMPAIGNS = parse_campaigns(
    {
        "campaigns": [
            {
                "id": "cart",
                "trigger": {"type": "absence", "start": ["add_to_cart"], "cancel": ["purchase"],
                            "after": "30m"},
                "message": {"template": "x"},
            },
            {"id": "hi", "trigger": {"type": "event", "event": "signup"},
             "message": {"template": "x"}},
        ]
    }
)  # fmt: skip

# A value in the original format (plain ``json.dumps`` of the field list, first byte "["), as
# written before the orjson/LZ4 formats existed: one committed event, one in the tail.
OLD_PLAIN_JSON = (
    b'["u1",1710325382000,1710325412000,2,'
    b'{"f":{"pc":0,"fs":1710325352000,"ls":1710325352000,"lp":null,"r":[[475090,1]],'
    b'"sid":"s1","si":1},"c":{"cart":{"ep":["e1",1710325352000,1710327152000,["e1"],'
    b'{"product_id":"p1"},null]}},"d":{"cart":1710327152000}},'
    b'{"f":{"pc":0,"fs":1710325352000,"ls":1710325412000,"lp":null,"r":[[475090,2]],'
    b'"sid":"s1","si":1},"c":{"cart":{"ep":["e1",1710325352000,1710327152000,["e1"],'
    b'{"product_id":"p1"},null]}},"d":{"cart":1710327152000}},'
    b'[[1710325412000,2,{"event_id":"e2","user_id":"u1","event_type":"page_view",'
    b'"ts":1710325412000,"session_id":"s1","properties":{}}]],'
    b'{"e1":1710325352000,"e2":1710325412000},{}]'
)

# ``busy_state()`` as the LZ4 + orjson format (first byte 0x02) wrote it.
BUSY_LZ4_JSON = bytes.fromhex(
    "02c4030000f5045b227531222c313731303332353433323030300e0011360e00f405332c7b2266223a7b2270"
    "63223a302c226673223a3000113122002f226c130000f01470223a6e756c6c2c2272223a5b5b343735303930"
    "2c315d5d2c22736964223a227331220b0070223a317d2c2263600040636172740800776570223a5b22659700"
    "0267000275002237320e00012200c15d2c7b2270726f647563745f560010705600041200f0076e616d65223a"
    "2268696b696e6720706f6c6573227d2c9600605d7d7d2c22646d00027500095b002f7d7df2001b0227010ff2"
    "00041f33f20076402c226869f200246c66f00006bb0030617374a601362265330c0201d7001f5d2a010d245b"
    "5b3c0211350c0283322c7b226576656e9001926532222c22757365729f01006c02031f00307479709d01d770"
    "6167655f76696577222c22744702024e00822273657373696f6e3e00013302a070726f70657274696573cd00"
    "003f00c5223a222f702f31227d7d5d2c8e0001be0001bc02088e001f338e000c6b7369676e75708b00024b00"
    "0f8b000d307d7d5d8e022665315e0102a90236226532130003d7002665331300015f00007302f012642d3234"
    "37343234346439623037646634336461303230353637613863326138611703296869a2015030305d7d5d"
)

REPO = Path(__file__).resolve().parents[3]
# Table values (header + state) of 200 simulated users half-way through a stream with disorder
# and duplicates, as the LZ4 + orjson format wrote them, the second half of that stream, and what
# the engine then emitted (decisions, cancellations, rejections, filtered, wake-ups, the flush).
UPGRADE_FIXTURE = REPO / "tests" / "fixtures" / "user_state_v1.json.gz"


def ev(eid: str, etype: str, ts: int, **props: str) -> ClickEvent:
    return ClickEvent(eid, "u1", etype, ts, "s1", dict(props))


def busy_state() -> UserState:
    """A state with every part filled: committed and head cores, a tail, a pending timer."""
    eng = Engine(CAMPAIGNS, allowed_lateness_ms=30 * S)
    st = None
    for e in [
        ev("e1", "add_to_cart", T0, product_id="p1", product_name="hiking poles"),
        ev("e2", "page_view", T0 + 40 * S, page="/p/1"),
        ev("e3", "signup", T0 + 50 * S),
    ]:
        st = eng.on_event(st, e).state
    assert st is not None and st.tail and st.head is not None and st.committed.deadlines
    return st


def continue_with(st: UserState) -> list[tuple[str, int]]:
    """What the engine decides from this state on: the state's observable behaviour."""
    eng = Engine(CAMPAIGNS, allowed_lateness_ms=30 * S)
    step = eng.on_event(st, ev("e4", "signup", T0 + 5 * M))
    out = [(d.decision_id, d.fire_at) for d in step.decisions]
    assert step.state is not None
    out += [(d.decision_id, d.fire_at) for d in eng.on_time(step.state, FLUSH_MS).decisions]
    return out


def test_round_trip_gives_an_equal_state_that_behaves_the_same() -> None:
    st = busy_state()
    data = st.to_bytes()
    back = UserState.from_bytes(data)
    assert back == st and back is not st
    assert back.to_bytes() == data
    assert continue_with(back) == continue_with(busy_state()) != []


def test_small_states_are_packed_and_large_ones_lz4() -> None:
    small = UserState("u1")
    data = small.to_bytes()
    assert data[0] == 0x03 and msgpack.unpackb(data[1:])[0] == "u1"
    assert len(data) < COMPRESS_MIN
    assert UserState.from_bytes(data) == small

    big = busy_state()
    data = big.to_bytes()
    assert data[0] == 0x04
    body = bytes(cramjam.lz4.decompress_block(data[1:]))
    assert len(body) >= COMPRESS_MIN and len(data) < len(body)
    assert UserState.from_bytes(data) == big
    # the packed state is well under half the original format's
    assert len(data) * 2 < len(BUSY_LZ4_JSON)


def test_the_original_orjson_formats_still_read() -> None:
    """0x01 (orjson of the keyed layout) and 0x02 (its LZ4 block) decode to the same state."""
    body = cramjam.lz4.decompress_block(BUSY_LZ4_JSON[1:])
    assert UserState.from_bytes(b"\x01" + bytes(body)) == busy_state()
    fields = orjson.loads(bytes(body))
    fields[5] = None  # no head, an empty tail: a state the original format kept small
    fields[6] = []
    small = b"\x01" + orjson.dumps(fields)
    st = UserState.from_bytes(small)
    assert st.head is None and not st.tail and st.committed == busy_state().committed


def test_old_plain_json_values_still_read() -> None:
    old = UserState.from_bytes(OLD_PLAIN_JSON)
    assert (old.user_id, old.seq, [e.event.event_id for e in old.tail]) == ("u1", 2, ["e2"])
    # It is the state the current engine builds from the same events...
    eng = Engine(CAMPAIGNS, allowed_lateness_ms=30 * S)
    st = eng.on_event(None, ev("e1", "add_to_cart", T0 - M, product_id="p1")).state
    st = eng.on_event(st, ev("e2", "page_view", T0)).state
    assert st == old
    # ...and rewriting it in the current format changes nothing.
    assert UserState.from_bytes(old.to_bytes()) == old
    assert json.loads(OLD_PLAIN_JSON)[7] == old.seen


def test_ints_beyond_64_bits_fall_back_to_json_exactly() -> None:
    st = busy_state()
    st.seen["huge"] = 2**70
    data = st.to_bytes()
    assert data[:1] == b"\x05"
    assert UserState.from_bytes(data).seen["huge"] == 2**70


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x07whatever",  # a format byte this version does not know
        b"\x01",
        b"\x01not json",
        b"\x01[1,2,3]",  # wrong number of fields
        b'\x01["u1",0,0,0,{},null,[],{},{},"extra"]',
        b'\x01[7,0,0,0,{"f":{},"c":{}},null,[],{},{}]',  # user id not a string
        b'\x01["u1","0",0,0,{"f":{},"c":{}},null,[],{},{}]',  # watermark not an int
        b'\x01["u1",0,0,0,[],null,[],{},{}]',  # committed core not an object
        b'\x01["u1",0,0,0,{"f":{},"c":{}},7,[],{},{}]',  # head neither null nor an object
        b'\x01["u1",0,0,0,{"f":{},"c":{}},null,{},{},{}]',  # tail not a list
        b"\x02\x10\x00\x00\x00garbage",  # LZ4 block that does not decompress
        b"\x03",
        b"\x03\xc1",  # not msgpack
        b"\x03" + msgpack.packb([1, 2, 3]),  # wrong number of fields
        b"\x03" + msgpack.packb([7, 0, 0, 0, [], None, [], [], []]),  # user id not a string
        b"\x03" + msgpack.packb(["u1", 0, 0, 0, {}, None, [], [], []]),  # core not an array
        b"\x03"
        + msgpack.packb(
            ["u1", 0, 0, 0, [[0, None, None, None, [], None, 0], {}], 7, [], [], []]
        ),  # head neither nil nor an array
        b"\x03" + msgpack.packb(["u1", 0, 0, 0, [[0], {}], None, [], [], []]),  # short facts
        b"\x04\x10\x00\x00\x00garbage",
        b"\x05[1,2",
        b"[1,2",  # truncated plain JSON
    ],
)
def test_corrupt_values_raise_state_format_error(data: bytes) -> None:
    with pytest.raises(StateFormatError):
        UserState.from_bytes(data)
    assert issubclass(StateFormatError, ValueError)


@pytest.mark.parametrize("data", [busy_state().to_bytes(), BUSY_LZ4_JSON])
def test_truncated_lz4_value_raises_state_format_error(data: bytes) -> None:
    assert data[0] in (0x02, 0x04)
    with pytest.raises(StateFormatError):
        UserState.from_bytes(data[: len(data) // 2])


def _run(engine: Engine, states: dict[str, UserState], events: list[ClickEvent]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        step = engine.on_event(states.get(e.user_id), e)
        out += [
            ["d", d.decision_id, d.fire_at, d.variant, d.stage, d.trigger_ts,
             list(d.trigger_event_ids), d.properties]
            for d in step.decisions
        ]  # fmt: skip
        out += [["c", c.decision_id, c.reason, c.at] for c in step.cancellations]
        out += [["r", x.event_id, why] for x, why in step.rejected]
        out += [["f", cid, why] for cid, why in step.filtered]
        if step.state is None:
            states.pop(e.user_id, None)
        else:
            states[e.user_id] = step.state
            out.append(["w", e.user_id, step.wake_at])
    for user in sorted(states):
        step = engine.on_time(states[user], FLUSH_MS)
        out += [
            ["d", d.decision_id, d.fire_at, d.variant, d.stage, d.trigger_ts,
             list(d.trigger_event_ids), d.properties]
            for d in step.decisions
        ]  # fmt: skip
        out += [["c", c.decision_id, c.reason, c.at] for c in step.cancellations]
    return out


def test_lz4_json_value_of_a_busy_state_still_reads() -> None:
    old = UserState.from_bytes(BUSY_LZ4_JSON)
    assert old == busy_state()
    assert continue_with(old) == continue_with(busy_state())


def test_a_running_deployment_upgrades_in_place() -> None:
    """Every user's stored value from the previous format: the engine reads it, and carries on
    exactly as the engine that wrote it did (same decisions, exits, rejections, wake-ups)."""
    with gzip.open(UPGRADE_FIXTURE, "rt") as f:
        doc = json.load(f)
    engine = Engine(
        load_campaigns(REPO / doc["campaigns"]), allowed_lateness_ms=doc["allowed_lateness_ms"]
    )
    states: dict[str, UserState] = {}
    for user, value in doc["values"].items():
        stored = unpack_state(bytes.fromhex(value))
        states[user] = UserState.from_bytes(stored.state)
        assert stored.wake_at == engine.wake_at(states[user])
    events = [ClickEvent(**r) for r in doc["events"]]
    assert _run(engine, states, events) == doc["expected"]
