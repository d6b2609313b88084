"""The engine's per-user state bytes (the ``user_state`` table and its changelog).

A rolling upgrade reads values written by older versions, so every format ``to_bytes`` ever
wrote must keep decoding to the same state; anything unreadable must raise ``StateFormatError``
(a ``ValueError``), which the worker treats as bad data rather than crashing on it later.
"""

from __future__ import annotations

import json

import cramjam
import orjson
import pytest

from processors.core.campaign import parse_campaigns
from processors.core.engine import (
    FLUSH_MS,
    STATE_COMPRESS_MIN,
    Engine,
    StateFormatError,
    UserState,
)
from processors.core.events import ClickEvent

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
    assert st is not None and st.tail and st.head is not None and st.committed.get("d")
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


def test_small_states_are_plain_orjson_and_large_ones_lz4() -> None:
    small = UserState("u1")
    data = small.to_bytes()
    assert data[0] == 0x01 and orjson.loads(data[1:])[0] == "u1"
    assert UserState.from_bytes(data) == small

    big = busy_state()
    body = orjson.dumps(
        [big.user_id, big.wm, big.max_ts, big.seq, big.committed, big.head, big.tail, big.seen,
         big.spec],
        option=orjson.OPT_NON_STR_KEYS,
    )  # fmt: skip
    assert len(body) >= STATE_COMPRESS_MIN
    data = big.to_bytes()
    assert data[0] == 0x02 and len(data) < len(body)
    assert bytes(cramjam.lz4.decompress_block(data[1:])) == body
    assert UserState.from_bytes(data) == big


def test_old_plain_json_values_still_read() -> None:
    old = UserState.from_bytes(OLD_PLAIN_JSON)
    assert (old.user_id, old.seq, [e[2]["event_id"] for e in old.tail]) == ("u1", 2, ["e2"])
    # It is the state the current engine builds from the same events...
    eng = Engine(CAMPAIGNS, allowed_lateness_ms=30 * S)
    st = eng.on_event(None, ev("e1", "add_to_cart", T0 - M, product_id="p1")).state
    st = eng.on_event(st, ev("e2", "page_view", T0)).state
    assert st == old
    # ...and rewriting it in the current format changes nothing.
    assert UserState.from_bytes(old.to_bytes()) == old
    assert json.loads(OLD_PLAIN_JSON)[7] == old.seen


def test_ints_beyond_64_bits_fall_back_to_plain_json_exactly() -> None:
    st = busy_state()
    st.seen["huge"] = 2**70
    data = st.to_bytes()
    assert data[:1] == b"["
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
        b"[1,2",  # truncated plain JSON
    ],
)
def test_corrupt_values_raise_state_format_error(data: bytes) -> None:
    with pytest.raises(StateFormatError):
        UserState.from_bytes(data)
    assert issubclass(StateFormatError, ValueError)


def test_truncated_lz4_value_raises_state_format_error() -> None:
    data = busy_state().to_bytes()
    assert data[0] == 0x02
    with pytest.raises(StateFormatError):
        UserState.from_bytes(data[: len(data) // 2])
