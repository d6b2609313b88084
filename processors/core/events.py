"""Clickstream events: the canonical JSON shape and its validation.

Canonical JSON (one object per line in every file-based command)::

    {"event_id": "e1", "user_id": "u1", "event_type": "add_to_cart",
     "ts": "2024-03-13T10:23:32Z", "session_id": "s1", "properties": {"product_id": "p9"}}

``ts`` is ISO-8601 (a zone is required, ``Z`` or an offset) or epoch milliseconds. ``event_id`` is
optional in files: a stable id is derived from the record's content so that replaying the same
file twice yields the same ids (and therefore the same decision ids).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MemberDescriptorType
from typing import Any, Final, cast

# Sanity bounds: events outside 2000-01-01 .. 2100-01-01 are almost certainly unit mistakes
# (seconds instead of milliseconds, or microseconds).
MIN_TS_MS: Final = 946_684_800_000
MAX_TS_MS: Final = 4_102_444_800_000
MAX_PROPERTIES: Final = 64
MAX_KEY_LEN: Final = 128
MAX_VALUE_LEN: Final = 2_048
MAX_ID_LEN: Final = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DIGITS = re.compile(r"-?[0-9]+")  # ASCII only: str.isdigit() also accepts "²" and "٣"


class EventError(ValueError):
    """A clickstream record that cannot be accepted; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True, init=False)
class ClickEvent:
    """One clickstream event, immutable. Equality and ``repr`` by fields (the dataclass's);
    pickles and copies by its fields. The compiled build makes it a native class, which
    interpreted code cannot subclass."""

    event_id: str
    user_id: str
    event_type: str
    ts: int  # epoch milliseconds, event time
    session_id: str | None = None
    properties: dict[str, str] = field(default_factory=dict)

    def __init__(
        self,
        event_id: str,
        user_id: str,
        event_type: str,
        ts: int,
        session_id: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> None:
        """Every field as given (``properties`` a new empty dict when left out); no validation."""
        if properties is None:
            properties = {}
        if _SLOT_FIELDS:  # interpreted: the frozen dataclass refuses ``self.x =``, a slot does not
            _set_event_id(self, event_id)
            _set_user_id(self, user_id)
            _set_event_type(self, event_type)
            _set_ts(self, ts)
            _set_session_id(self, session_id)
            _set_properties(self, properties)
            return
        # compiled: plain stores into the native instance (only Python-level setattr is refused)
        self.event_id = event_id  # type: ignore[misc]
        self.user_id = user_id  # type: ignore[misc]
        self.event_type = event_type  # type: ignore[misc]
        self.ts = ts  # type: ignore[misc]
        self.session_id = session_id  # type: ignore[misc]
        self.properties = properties  # type: ignore[misc]

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (
            self.event_id,
            self.user_id,
            self.event_type,
            self.ts,
            self.session_id,
            self.properties,
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ClickEvent:
        """From a decoded Avro ``ClickEvent`` dict (already typed); validates the content (the
        checks of :func:`validate`, on the values before the event is built)."""
        event_id = record["event_id"]
        user_id = record["user_id"]
        event_type = record["event_type"]
        ts = int(record["ts"])
        session_id = record.get("session_id")
        properties = dict(record.get("properties") or {})
        _check(event_id, user_id, event_type, ts, session_id, properties)
        if cls is not ClickEvent:  # a subclass: its own __init__ may matter
            return validate(
                cls(
                    event_id=event_id,
                    user_id=user_id,
                    event_type=event_type,
                    ts=ts,
                    session_id=session_id,
                    properties=properties,
                )
            )
        return ClickEvent(event_id, user_id, event_type, ts, session_id, properties)

    def to_record(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "event_type": self.event_type,
            "ts": self.ts,
            "session_id": self.session_id,
            "properties": self.properties,
        }

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON form (ISO time)."""
        return {**self.to_record(), "ts": iso_ms(self.ts)}


def _slot_setter(name: str) -> Callable[[ClickEvent, Any], None]:
    return cast(Callable[[ClickEvent, Any], None], vars(ClickEvent)[name].__set__)


# Slots (member descriptors) in the interpreted build; a native class's fields in the compiled one.
_SLOT_FIELDS: Final = isinstance(vars(ClickEvent)["event_id"], MemberDescriptorType)
_set_event_id = _slot_setter("event_id")
_set_user_id = _slot_setter("user_id")
_set_event_type = _slot_setter("event_type")
_set_ts = _slot_setter("ts")
_set_session_id = _slot_setter("session_id")
_set_properties = _slot_setter("properties")


def make_event(
    event_id: str,
    user_id: str,
    event_type: str,
    ts: int,
    session_id: str | None,
    properties: dict[str, str],
) -> ClickEvent:
    """``ClickEvent(...)`` with every field given. No validation, like the constructor."""
    return ClickEvent(event_id, user_id, event_type, ts, session_id, properties)


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with a ``Z`` (milliseconds only when non-zero)."""
    dt = _EPOCH + timedelta(milliseconds=ms)  # integer maths: no float rounding
    if ms % 1000:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(value: Any) -> int:
    """ISO-8601 with a zone, or epoch milliseconds (int or digit string) -> epoch milliseconds."""
    if isinstance(value, bool):
        raise EventError("bad_ts", f"ts must be ISO-8601 or epoch milliseconds, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EventError("bad_ts", f"ts must be a finite number, got {value!r}")
    if isinstance(value, int | float):
        ms = int(value)
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        ms = int(value.strip())
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise EventError("bad_ts", f"ts {value!r} is not ISO-8601") from None
        if dt.tzinfo is None:
            raise EventError("bad_ts", f"ts {value!r} has no time zone (add Z or an offset)")
        ms = round(dt.timestamp() * 1000)
    else:
        raise EventError("bad_ts", f"ts must be ISO-8601 or epoch milliseconds, got {value!r}")
    return ms


def derive_event_id(obj: dict[str, Any]) -> str:
    """A stable id from the record's content (key order and whitespace do not matter)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "h-" + hashlib.blake2b(canonical.encode(), digest_size=12).hexdigest()


def _text(obj: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None or value == "":
        if required:
            raise EventError(f"missing_{key}", f"{key} is missing or empty")
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise EventError(f"bad_{key}", f"{key} must be a string, got {type(value).__name__}")
    return value


def _properties(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EventError("bad_properties", "properties must be an object of strings")
    props: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        elif value is None:
            continue
        elif not isinstance(value, str):
            raise EventError("bad_properties", f"property {key!r} must be a string or number")
        props[str(key)] = value
    return props


def parse_event(obj: Any) -> ClickEvent:
    """Canonical JSON object -> validated ``ClickEvent`` (raises ``EventError``). The same
    result or error as :func:`parse_any_event`, whose shortcut for the commonest records it
    takes first (``tests/unit/core/test_event_parsing.py``)."""
    if type(obj) is dict:
        event = _plain_event(obj)
        if event is not None:
            return validate(event)
    return parse_any_event(obj)


def parse_any_event(obj: Any) -> ClickEvent:
    """The reference reading of a record: every accepted form (numbers as ids, epoch or ISO
    ``ts`` with any zone, number and boolean properties, a derived ``event_id``)."""
    if not isinstance(obj, dict):
        raise EventError("not_an_object", "each line must be a JSON object")
    ts_raw = obj.get("ts")
    if ts_raw is None or ts_raw == "":
        raise EventError("missing_ts", "ts is missing")
    event_id = _text(obj, "event_id", required=False) or derive_event_id(obj)
    event = ClickEvent(
        event_id=event_id,
        user_id=_text(obj, "user_id", required=True) or "",
        event_type=_text(obj, "event_type", required=True) or "",
        ts=parse_ts(ts_raw),
        session_id=_text(obj, "session_id", required=False),
        properties=_properties(obj.get("properties")),
    )
    return validate(event)


def _plain_event(obj: dict[str, Any]) -> ClickEvent | None:
    """The event of the commonest record (string ids, ISO ``...Z`` or integer ``ts``, string
    properties), unvalidated, as :func:`parse_event`'s general path would build it; None for
    any other record, which that path then reads (and rejects with its reason)."""
    event_id = obj.get("event_id")
    user_id = obj.get("user_id")
    event_type = obj.get("event_type")
    session_id = obj.get("session_id")
    ts_raw = obj.get("ts")
    raw = obj.get("properties")
    if not (
        type(event_id) is str
        and event_id
        and type(user_id) is str
        and user_id
        and type(event_type) is str
        and event_type
    ):
        return None
    if session_id == "":
        session_id = None
    elif session_id is not None and type(session_id) is not str:
        return None
    properties: dict[str, str]
    if raw is None:
        properties = {}
    elif type(raw) is dict:
        for key, value in raw.items():
            if type(value) is not str or type(key) is not str:
                return None
        properties = dict(raw)
    else:
        return None
    if type(ts_raw) is int:
        ts = ts_raw
    elif type(ts_raw) is str and ts_raw.endswith("Z"):
        try:
            dt = datetime.fromisoformat(ts_raw.strip()[:-1] + "+00:00")
        except ValueError:
            return None
        if dt.tzinfo is None:
            return None
        ts = round(dt.timestamp() * 1000)
    else:
        return None
    return ClickEvent(event_id, user_id, event_type, ts, session_id, properties)


CSV_COLUMNS = ("event_id", "user_id", "event_type", "ts", "session_id")


def parse_csv_row(row: dict[str, str]) -> ClickEvent:
    """CSV: columns event_id, user_id, event_type, ts, session_id; every other column is a
    property (empty cells are left out)."""
    obj: dict[str, Any] = {k: row.get(k) for k in CSV_COLUMNS if row.get(k) not in (None, "")}
    props = {k: v for k, v in row.items() if k not in CSV_COLUMNS and k and v not in (None, "")}
    if props:
        obj["properties"] = props
    return parse_event(obj)


def validate(event: ClickEvent) -> ClickEvent:
    """Bounds every event must satisfy, whatever path it came by (file, Avro, tests)."""
    _check(
        event.event_id,
        event.user_id,
        event.event_type,
        event.ts,
        event.session_id,
        event.properties,
    )
    return event


def _check(
    event_id: object,
    user_id: object,
    event_type: object,
    ts: int,
    session_id: object,
    properties: dict[Any, Any],
) -> None:
    """:func:`validate`'s checks on an event's values: they may be of any type (a record's
    values are checked before a compiled ``ClickEvent``, whose fields are typed, is built)."""
    # Fast path (every valid event): plain non-blank strings within bounds. Anything else takes
    # the checks below, in their documented order, so each bad event gets the same reason.
    if not (
        type(event_id) is str
        and type(user_id) is str
        and type(event_type) is str
        and 0 < len(event_id) <= MAX_ID_LEN
        and 0 < len(user_id) <= MAX_ID_LEN
        and 0 < len(event_type) <= MAX_ID_LEN
        and not event_id.isspace()
        and not user_id.isspace()
        and not event_type.isspace()
    ):
        for name, value in (
            ("event_id", event_id),
            ("user_id", user_id),
            ("event_type", event_type),
        ):
            if not isinstance(value, str) or not value.strip():
                raise EventError(f"missing_{name}", f"{name} is missing or empty")
            if len(value) > MAX_ID_LEN:
                raise EventError(f"bad_{name}", f"{name} is longer than {MAX_ID_LEN} characters")
    if cast(str, user_id).startswith("\x00"):  # NUL-prefixed keys are the worker's own state keys
        raise EventError("bad_user_id", "user_id starts with a NUL character")
    if session_id is not None and not isinstance(session_id, str):
        raise EventError(
            "bad_session_id", f"session_id must be a string, got {type(session_id).__name__}"
        )
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise EventError(
            "ts_out_of_range", f"ts {ts} is outside 2000..2100 (epoch milliseconds expected)"
        )
    if len(properties) > MAX_PROPERTIES:
        raise EventError("oversized_properties", f"more than {MAX_PROPERTIES} properties")
    for key, value in properties.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EventError("bad_properties", f"property {key!r} must be a string")
        if len(key) > MAX_KEY_LEN or len(value) > MAX_VALUE_LEN:
            raise EventError(
                "oversized_properties",
                f"property {key[:40]!r} exceeds {MAX_KEY_LEN}/{MAX_VALUE_LEN} characters",
            )
