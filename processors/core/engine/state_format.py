"""The bytes of the ``user_state`` table (and its changelog): the one owner of that format.

A table value is an 11-byte header (:func:`pack_state`: header version, the partition the user
lives on, the user's next wake-up, so the worker's timer index is rebuilt without decoding
states) followed by the engine's state (:func:`encode_state`), whose first byte says how the
rest is encoded:

=====  =================================================================================
tag    state encoding
=====  =================================================================================
0x03   packed: msgpack of positional arrays (layout below), timestamps as deltas
0x04   packed, LZ4 block (with its size prefix): states of at least ``COMPRESS_MIN`` bytes
0x05   packed arrays as JSON text: a value beyond 64 bits (msgpack has no such int)
``[``  original format: JSON of keyed objects (still read; older values in a running
       deployment upgrade in place when next written)
0x01   orjson of the original layout (still read)
0x02   LZ4 block of 0x01 (still read)
=====  =================================================================================

Packed layout, every timestamp as its difference from ``max_ts`` (``b``)::

    state   [user_id, max_ts, max_ts - wm, seq, core, head core | nil, [tail entry...],
             [event_id, ts-b, ...] (seen), [key, campaign_id, at-b, ...] (spec)]
    core    [facts, {campaign_id: campaign}]       (deadlines are derived: next_deadline)
    facts   [purchases, first_seen-b, last_seen-b, last_purchase-b, [hour-h, count, ...],
             session_id, session_intent]            (h = b // HOUR_MS)
    campaign [episode | nil, [key, fire_at-b, ...] (fired), {group: [ts-b, id, ...]},
              {group: ts-b} (group_fired), last_scheduled-b | nil, [pending...]]
              (trailing empty fields left out)
    episode [first_id, first_ts-b, deadline-b, [ids], {props}, gap]
    pending [fire_at-b, key, ts-b, [ids], {props}, gap]
    tail    [ts-b, seq, event_id, event_type, session_id, {props}]

Why this layout (docs/adr/0030-packed-user-state.md): no keys, small ints instead of epoch
milliseconds and LZ4 over the near-duplicate head and committed cores.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import cramjam
import msgpack
import orjson

from processors.core.engine.state import Core, Speculation, TailEntry, UserState
from processors.core.events import ClickEvent
from processors.core.segment import HOUR_MS, Facts, HourCount
from processors.core.trigger import CampaignState, Episode, Fired, Pending, Sighting

_HEADER = struct.Struct(">BHq")  # header version, partition, wake_at (NO_WAKE = none)
_HEADER_VERSION = 1
NO_WAKE = -(2**63)

_JSON = 0x5B  # "["
_ORJSON = 0x01
_ORJSON_LZ4 = 0x02
_PACKED = 0x03
_PACKED_LZ4 = 0x04
_PACKED_JSON = 0x05
COMPRESS_MIN = 128  # smaller packed states gain nothing from LZ4
_PACKER = msgpack.Packer()
"""``msgpack.packb`` makes a Packer, with a 256 KiB buffer, per call; this one is reused (its
``pack`` runs in C under the GIL and resets its buffer, also after an error)."""


class StateFormatError(ValueError):
    """Stored user state this version cannot read (corrupt, or written by a newer format)."""


@dataclass(frozen=True, slots=True)
class StoredState:
    """A decoded table value: where the user lives, when to wake it, the engine's state bytes."""

    partition: int
    wake_at: int | None
    state: bytes


def pack_state(partition: int, wake_at: int | None, state: bytes) -> bytes:
    """Table value: the 11-byte header (version, partition, wake_at) + the state's bytes."""
    wake = NO_WAKE if wake_at is None else wake_at
    return _HEADER.pack(_HEADER_VERSION, partition, wake) + state


def unpack_state(value: bytes) -> StoredState:
    if len(value) < _HEADER.size:
        raise StateFormatError(f"user_state value of {len(value)} bytes is shorter than its header")
    version, partition, wake = _HEADER.unpack_from(value)
    if version != _HEADER_VERSION:
        raise StateFormatError(f"user_state value has format version {version}, expected 1")
    return StoredState(partition, None if wake == NO_WAKE else wake, value[_HEADER.size :])


# --------------------------------------------------------------------------- encoding


def encode_state(st: UserState) -> bytes:
    """The state's bytes (tag 0x03, 0x04 or 0x05)."""
    fields = _pack(st)
    try:
        body = _PACKER.pack(fields)
    except OverflowError:  # an int beyond 64 bits: JSON keeps it exact
        return bytes([_PACKED_JSON]) + json.dumps(fields, separators=(",", ":")).encode()
    if len(body) < COMPRESS_MIN:
        return b"\x03" + body
    return b"\x04" + cramjam.lz4.compress_block(body)  # bytes + buffer: one copy


def _d(ts: int | None, base: int) -> int | None:
    return None if ts is None else ts - base


def _trim(fields: list[Any]) -> list[Any]:
    while fields and (fields[-1] is None or fields[-1] == [] or fields[-1] == {}):
        fields.pop()
    return fields


def _pack(st: UserState) -> list[Any]:
    b = st.max_ts
    seen: list[Any] = []
    for event_id, ts in st.seen.items():
        seen += (event_id, ts - b)
    spec: list[Any] = []
    for key, s in st.spec.items():
        spec += (key, s.campaign_id, s.at - b)
    head = st.head
    return [
        st.user_id, b, b - st.wm, st.seq, _pack_core(st.committed, b),
        None if head is None else _pack_core(head, b),
        [[e.ts - b, e.seq, e.event.event_id, e.event.event_type, e.event.session_id,
          e.event.properties] for e in st.tail],
        seen, spec,
    ]  # fmt: skip


def _pack_core(core: Core, b: int) -> list[Any]:
    f = core.facts
    h = b // HOUR_MS
    recent: list[int] = []
    for bucket in f.recent:
        recent += (bucket.hour - h, bucket.count)
    facts = [f.purchases, _d(f.first_seen, b), _d(f.last_seen, b), _d(f.last_purchase, b),
             recent, f.session_id, f.session_intent]  # fmt: skip
    return [facts, {cid: _pack_campaign(cs, b) for cid, cs in core.campaigns.items()}]


def _pack_campaign(cs: CampaignState, b: int) -> list[Any]:
    ep = cs.episode
    fired: list[Any] = []
    for f in cs.fired:
        fired += (f.key, f.fire_at - b)
    groups: dict[str, list[Any]] = {}
    for group, sightings in cs.groups.items():
        flat: list[Any] = []
        for s in sightings:
            flat += (s.ts - b, s.event_id)
        groups[group] = flat
    return _trim([
        None if ep is None else
        [ep.first_id, ep.first_ts - b, ep.deadline - b, ep.ids, ep.props, ep.gap],
        fired, groups, {g: ts - b for g, ts in cs.group_fired.items()},
        _d(cs.last_scheduled, b),
        [[p.fire_at - b, p.key, p.ts - b, p.ids, p.props, p.gap] for p in cs.pending],
    ])  # fmt: skip


# --------------------------------------------------------------------------- decoding


def decode_state(data: bytes) -> UserState:
    """Any format ever written (module doc); ``StateFormatError`` if unreadable."""
    try:
        tag = data[0]
        if tag == _PACKED_LZ4:
            return _unpack(msgpack.unpackb(memoryview(cramjam.lz4.decompress_block(data[1:]))))
        if tag == _PACKED:
            return _unpack(msgpack.unpackb(data[1:]))
        if tag == _PACKED_JSON:
            return _unpack(json.loads(data[1:]))
        if tag == _ORJSON_LZ4:
            return _legacy(orjson.loads(memoryview(cramjam.lz4.decompress_block(data[1:]))))
        if tag == _ORJSON:
            return _legacy(orjson.loads(data[1:]))
        if tag == _JSON:
            return _legacy(json.loads(data))
        raise StateFormatError(f"unknown user state format byte 0x{tag:02x}")
    except StateFormatError:
        raise
    except (
        IndexError, ValueError, TypeError, KeyError, AttributeError, OverflowError,
        cramjam.DecompressionError,
    ) as exc:  # fmt: skip
        raise StateFormatError(f"unreadable user state: {type(exc).__name__}") from None


def _check(ok: bool) -> None:
    if not ok:
        raise StateFormatError("unreadable user state: a field has the wrong type")


def _a(ts: int | None, base: int) -> int | None:
    return None if ts is None else ts + base


def _unpack(fields: Any) -> UserState:
    user_id, b, behind, seq, committed, head, tail, seen, spec = fields
    _check(
        type(user_id) is str and type(b) is int and type(behind) is int and type(seq) is int
        and type(committed) is list and (head is None or type(head) is list)
        and type(tail) is list and type(seen) is list and type(spec) is list
    )  # fmt: skip
    entries = [
        TailEntry(ts + b, n, ClickEvent(event_id, user_id, event_type, ts + b, session, props))
        for ts, n, event_id, event_type, session, props in tail
    ]
    return UserState(
        user_id, b - behind, b, seq, _unpack_core(committed, b),
        None if head is None else _unpack_core(head, b), entries,
        {seen[i]: seen[i + 1] + b for i in range(0, len(seen), 2)},
        {spec[i]: Speculation(spec[i + 1], spec[i + 2] + b) for i in range(0, len(spec), 3)},
    )  # fmt: skip


def _unpack_core(fields: list[Any], b: int) -> Core:
    (purchases, first_seen, last_seen, last_purchase, recent, session, intent), campaigns = fields
    h = b // HOUR_MS
    facts = Facts(
        purchases, _a(first_seen, b), _a(last_seen, b), _a(last_purchase, b),
        [HourCount(recent[i] + h, recent[i + 1]) for i in range(0, len(recent), 2)],
        session, intent,
    )  # fmt: skip
    states = {cid: _unpack_campaign(cs, b) for cid, cs in campaigns.items()}
    return _core(facts, states)


def _core(facts: Facts, states: dict[str, CampaignState]) -> Core:
    deadlines: dict[str, int] = {}
    for cid, cs in states.items():
        deadline = cs.next_deadline()
        if deadline is not None:
            deadlines[cid] = deadline
    return Core(facts, states, deadlines)


def _unpack_campaign(fields: list[Any], b: int) -> CampaignState:
    ep, fired, groups, group_fired, last_scheduled, pending = fields + [None] * (6 - len(fields))
    return CampaignState(
        None if ep is None else Episode(ep[0], ep[1] + b, ep[2] + b, ep[3], ep[4], ep[5]),
        [Fired(fired[i], fired[i + 1] + b) for i in range(0, len(fired), 2)] if fired else [],
        {
            g: [Sighting(xs[i] + b, xs[i + 1]) for i in range(0, len(xs), 2)]
            for g, xs in groups.items()
        }
        if groups
        else {},
        {g: ts + b for g, ts in group_fired.items()} if group_fired else {},
        _a(last_scheduled, b),
        [Pending(p[0] + b, p[1], p[2] + b, p[3], p[4], p[5]) for p in pending] if pending else [],
    )


# --------------------------------------------------------------------------- original format


def _legacy(fields: Any) -> UserState:
    """The original layout: ``[user_id, wm, max_ts, seq, committed, head, tail, seen, spec]``
    with keyed cores (``{"f": facts, "c": {campaign: state}, "d": deadlines}``)."""
    u, wm, mx, seq, committed, head, tail, seen, spec = fields
    _check(
        type(u) is str and type(wm) is int and type(mx) is int and type(seq) is int
        and type(committed) is dict and (head is None or type(head) is dict)
        and type(tail) is list and type(seen) is dict and type(spec) is dict
    )  # fmt: skip
    entries = [
        TailEntry(ts, n, ClickEvent(r["event_id"], r["user_id"], r["event_type"], r["ts"],
                                    r.get("session_id"), r.get("properties") or {}))
        for ts, n, r in tail
    ]  # fmt: skip
    return UserState(
        u, wm, mx, seq, _legacy_core(committed), None if head is None else _legacy_core(head),
        entries, seen, {key: Speculation(cid, at) for key, (cid, at) in spec.items()},
    )  # fmt: skip


def _legacy_core(core: dict[str, Any]) -> Core:
    f = core["f"]
    facts = Facts(
        f["pc"], f["fs"], f["ls"], f["lp"], [HourCount(h, n) for h, n in f["r"]], f["sid"],
        f["si"],
    )  # fmt: skip
    states: dict[str, CampaignState] = {}
    for cid, raw in core["c"].items():
        cs = _legacy_campaign(raw)
        if not cs.is_empty():
            states[cid] = cs
    return _core(facts, states)


def _legacy_campaign(raw: dict[str, Any]) -> CampaignState:
    ep = raw.get("ep")
    last = raw.get("last") or []
    if last and isinstance(last[0], str):  # a single [key, fire_at] pair (older still)
        last = [last]
    lf = raw.get("lf")
    return CampaignState(
        None if not ep else Episode(ep[0], ep[1], ep[2], ep[3], ep[4], ep[5]),
        [Fired(key, at) for key, at in last],
        {g: [Sighting(ts, i) for ts, i in xs] for g, xs in (raw.get("g") or {}).items()},
        lf if isinstance(lf, dict) else {},
        lf if isinstance(lf, int) else None,
        [Pending(p[0], p[1], p[2], p[3], p[4], p[5]) for p in raw.get("p") or []],
    )
