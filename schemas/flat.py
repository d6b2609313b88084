"""Hand-written Avro writers and readers for flat records (every field a string, int, long or
null-or-one-of-those), generated once per schema: the same bytes as fastavro's, at a fraction of
its per-call cost. A record they cannot handle exactly returns None and goes to fastavro.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

HEADER_SIZE = 5  # the wire format's magic byte + schema id, before the Avro body

INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}

FlatWriter = Callable[[Mapping[str, Any], bytes], bytes | None]


def _varint(n: int) -> bytes:
    """Avro's zig-zag variable-length encoding of an int/long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = tuple(_varint(i) for i in range(-64, 64))  # one byte each


def _write_kind(schema: Any) -> int | None:
    """The kind of a (non-union) field type the plain-Python writer handles, else None."""
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "array":
            return _W_STRINGS if _write_kind(schema.get("items")) == _W_STR else None
        if kind == "map":
            return _W_MAP if _write_kind(schema.get("values")) == _W_STR else None
        if set(schema) != {"type"}:
            return None  # e.g. a logical type fastavro would convert
        schema = kind
    return (
        {"string": _W_STR, "int": _W_INT, "long": _W_LONG}.get(schema)
        if isinstance(schema, str)
        else None
    )


_W_STR, _W_INT, _W_LONG, _W_STRINGS, _W_MAP = range(5)


def _string(value: str) -> bytes:
    raw = value.encode()
    size = len(raw)
    return (_SMALL[size + 64] if size < 64 else _varint(size)) + raw


def _strings(value: Any, kind: int) -> bytes | None:
    """An array of strings or a map of strings to strings (one block), None if it is not."""
    if kind == _W_STRINGS:
        if type(value) is not list and type(value) is not tuple:
            return None
        items = value
    else:
        if type(value) is not dict:
            return None
        items = [x for pair in value.items() for x in pair]
    if not items:
        return b"\x00"
    out = [_varint(len(value))]
    for item in items:
        if type(item) is not str:
            return None
        out.append(_string(item))
    out.append(b"\x00")
    return b"".join(out)


def flat_writer(record_schema: Mapping[str, Any]) -> FlatWriter | None:
    """A plain-Python writer for a record whose fields are all string/int/long, a union of null
    and one of those, an array of strings or a map of strings (``SmsOutcome``,
    ``TriggerDecision``, ...): several times faster than fastavro's per-call set-up, same
    bytes. A field left out takes its schema default, as fastavro's ``strict_allow_default``.
    Returns None for other schemas; the writer returns None for a record it does not handle
    exactly (wrong type, missing field without default, unknown field, out of range), so that
    fastavro writes it or raises the usual :class:`RecordInvalid`."""
    specs = []
    for field in record_schema["fields"]:
        kind_of = field["type"]
        null_tag: bytes | None = None
        tag = b""
        if isinstance(kind_of, list):
            kinds = [b if isinstance(b, str) else b.get("type") for b in kind_of]
            if len(kinds) != 2 or "null" not in kinds or field.get("default", None) is not None:
                return None
            other = 1 - kinds.index("null")
            kind_of, null_tag, tag = kind_of[other], _varint(1 - other), _varint(other)
        kind = _write_kind(kind_of)
        if kind is None or (null_tag is not None and kind not in (_W_STR, _W_INT, _W_LONG)):
            return None
        low, high = INT_RANGES["int" if kind == _W_INT else "long"]
        default: bytes | None = None
        if "default" in field and null_tag is None:
            default = _value(field["default"], kind, low, high)
            if default is None:
                return None  # a default of the wrong type: fastavro decides
        elif "default" in field:
            default = null_tag  # a union's default is null (checked above)
        specs.append((field["name"], kind, low, high, null_tag, tag, default))
    names = frozenset(spec[0] for spec in specs)
    fields = tuple(specs)
    small = _SMALL
    longs: dict[int, bytes] = {}  # e.g. the times of a batch of outcomes: mostly the same

    def write(record: Mapping[str, Any], header: bytes) -> bytes | None:
        if not record.keys() <= names:
            return None
        out = [header]
        for name, kind, low, high, null_tag, tag, default in fields:
            value = record.get(name)
            if value is None:
                if name not in record:
                    if default is None:
                        return None
                    out.append(default)
                    continue
                if null_tag is None:
                    return None
                out.append(null_tag)
            elif kind == _W_STR:
                if type(value) is not str:
                    return None
                raw = value.encode()
                size = len(raw)
                out += (tag, small[size + 64] if size < 64 else _varint(size), raw)
            elif kind >= _W_STRINGS:
                block = _strings(value, kind)
                if block is None:
                    return None
                out.append(block)
            else:
                if type(value) is not int or not low <= value <= high:
                    return None
                if -64 <= value < 64:
                    out += (tag, small[value + 64])
                    continue
                known = longs.get(value)
                if known is None:
                    if len(longs) >= 1024:
                        longs.clear()
                    known = longs[value] = _varint(value)
                out += (tag, known)
        return b"".join(out)

    return write


def _value(value: Any, kind: int, low: int, high: int) -> bytes | None:
    """The bytes of a (non-null) default, None if it does not fit ``kind``."""
    if kind == _W_STR:
        return _string(value) if type(value) is str else None
    if kind >= _W_STRINGS:
        return _strings(value, kind)
    return _varint(value) if type(value) is int and low <= value <= high else None


FlatReader = Callable[[bytes], dict[str, Any] | None]
_STR, _INT, _LONG, _STRINGS, _STRING_MAP = range(5)


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint at ``pos``: (value, position after it); ValueError past 64 bits."""
    b = data[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        if shift > 63:
            raise ValueError("varint longer than a long")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


def _read_string(data: bytes, pos: int, size: int) -> tuple[str, int]:
    n, pos = _read_long(data, pos)
    end = pos + n
    if n < 0 or end > size:
        raise ValueError("string length out of the body")
    return data[pos:end].decode(), end


def _read_block(data: bytes, pos: int, size: int, strings: bool) -> tuple[Any, int]:
    """An array of strings (``strings``) or a map of strings at ``pos``: (value, end)."""
    items: list[str] = []
    pairs: dict[str, str] = {}
    count, pos = _read_long(data, pos)
    while count:
        if count < 0:  # a block with its size in bytes
            count = -count
            _block_size, pos = _read_long(data, pos)
        for _ in range(count):
            text, pos = _read_string(data, pos, size)
            if strings:
                items.append(text)
            else:
                pairs[text], pos = _read_string(data, pos, size)
        count, pos = _read_long(data, pos)
    return (items if strings else pairs), pos


def _flat_kind(schema: Any) -> int | None:
    """The kind of a field type the plain-Python reader handles, else None."""
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "array" and set(schema) == {"type", "items"}:
            return _STRINGS if _flat_kind(schema["items"]) == _STR else None
        if kind == "map" and set(schema) == {"type", "values"}:
            return _STRING_MAP if _flat_kind(schema["values"]) == _STR else None
        if set(schema) != {"type"}:
            return None  # e.g. a logical type fastavro would convert
        schema = kind
    kinds = {"string": _STR, "int": _INT, "long": _LONG}
    return kinds.get(schema) if isinstance(schema, str) else None


def flat_reader(record_schema: Mapping[str, Any]) -> FlatReader | None:
    """A plain-Python reader (after the wire header) for a record whose fields are all
    string/int/long, a union of null and one of those, an array of strings or a map of strings
    (``TriggerDecision``, ``SmsOutcome``, ...): ~25% faster than fastavro's per-call set-up, the
    same dict. Returns None for other schemas; the reader returns None (or raises) for a body
    it does not read exactly (a bad union index, an int out of range, a varint longer than a
    long, truncated, trailing bytes, bad UTF-8), so that fastavro reads it or raises the usual
    :class:`AvroDecodeError`. Only for a writer schema equal to the reader's.

    The reader is straight-line code generated from the schema (a loop over field specs costs
    as much as fastavro); field names go in as ``repr`` literals only."""
    lines = ["def read(data):", "    size = len(data)", f"    pos = {HEADER_SIZE}"]
    names = []
    for i, field in enumerate(record_schema["fields"]):
        kind_of = field["type"]
        null_at = -1
        if isinstance(kind_of, list):
            if len(kind_of) != 2 or "null" not in kind_of:
                return None
            null_at = kind_of.index("null")
            kind_of = kind_of[1 - null_at]
        kind = _flat_kind(kind_of)
        if kind is None or (null_at >= 0 and kind not in (_STR, _INT, _LONG)):
            return None
        names.append(str(field["name"]))
        target, indent = f"v{i}", "    "
        if null_at >= 0:
            lines += [
                "    branch = data[pos]",  # a one-byte varint: zig-zag 0 or 2
                "    pos += 1",
                f"    if branch == {null_at << 1}:",
                f"        {target} = None",
                f"    elif branch != {(1 - null_at) << 1}:",
                "        return None",
                "    else:",
            ]
            indent = "        "
        if kind == _STR:  # a length below 64: one byte, read inline
            lines += [
                f"{indent}n = data[pos]",
                f"{indent}if n < 128 and not n & 1:",
                f"{indent}    end = pos + 1 + (n >> 1)",
                f"{indent}    if end > size:",
                f"{indent}        return None",
                f"{indent}    {target} = data[pos + 1 : end].decode()",
                f"{indent}    pos = end",
                f"{indent}else:",
                f"{indent}    {target}, pos = _read_string(data, pos, size)",
            ]
        elif kind in (_LONG, _INT):
            lines.append(f"{indent}{target}, pos = _read_long(data, pos)")
            if kind == _INT:
                low, high = INT_RANGES["int"]
                lines += [
                    f"{indent}if not {low} <= {target} <= {high}:",
                    f"{indent}    return None",
                ]
        else:
            strings = kind == _STRINGS
            lines.append(f"{indent}{target}, pos = _read_block(data, pos, size, {strings})")
    body = ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names))
    lines += ["    if pos != size:", "        return None", f"    return {{{body}}}"]
    scope: dict[str, Any] = {
        "_read_long": _read_long,
        "_read_string": _read_string,
        "_read_block": _read_block,
    }
    exec("\n".join(lines), scope)  # noqa: S102 - generated above from the schema
    return cast(FlatReader, scope["read"])


def int_fields(record_schema: Mapping[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """(name, low, high) of the top-level int/long (or nullable int/long) fields of a record."""
    out = []
    for field in record_schema["fields"]:
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for branch in branches:
            kind = branch.get("type") if isinstance(branch, dict) else branch
            if kind in INT_RANGES:
                out.append((field["name"], *INT_RANGES[kind]))
    return tuple(out)
