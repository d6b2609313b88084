"""Why a record does not fit its Avro schema, in words a data engineer can act on
("ClickEvent.ts expected long, found str")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.flat import INT_RANGES

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "float": (int, float),
    "double": (int, float),
    "bytes": (bytes, bytearray, memoryview),
}


def _type_label(schema: Any) -> str:
    if isinstance(schema, list):
        return " or ".join(_type_label(s) for s in schema)
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "map":
            return f"map of {_type_label(schema['values'])}"
        if kind == "array":
            return f"array of {_type_label(schema['items'])}"
        if kind == "record":
            return f"{schema['name']} record"
        return schema.get("logicalType", _type_label(kind))
    return str(schema)


def problems(schema: Any, datum: Any, path: str) -> list[str]:
    """Why ``datum`` does not fit ``schema``: list of 'path expected X, found Y' messages."""
    found = type(datum).__name__
    if isinstance(schema, list):
        if any(not problems(branch, datum, path) for branch in schema):
            return []
        return [f"{path} expected {_type_label(schema)}, found {found}"]
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            if not isinstance(datum, Mapping):
                return [f"{path} expected a {schema['name']} record (dict), found {found}"]
            out: list[str] = []
            names = set()
            for field in schema["fields"]:
                names.add(field["name"])
                where = f"{path}.{field['name']}"
                if field["name"] not in datum:
                    if "default" not in field:
                        out.append(f"{where} is required ({_type_label(field['type'])}), missing")
                    continue
                out.extend(problems(field["type"], datum[field["name"]], where))
            extra = sorted(str(k) for k in datum if k not in names)
            if extra:
                out.append(f"{path} has fields not in the schema: {', '.join(extra)}")
            return out
        if kind == "map":
            if not isinstance(datum, Mapping):
                return [f"{path} expected {_type_label(schema)} (dict), found {found}"]
            out = []
            for key, value in datum.items():
                if not isinstance(key, str):
                    out.append(f"{path} map keys must be strings, found {type(key).__name__}")
                out.extend(problems(schema["values"], value, f"{path}[{key!r}]"))
            return out
        if kind == "array":
            if not isinstance(datum, list | tuple):
                return [f"{path} expected {_type_label(schema)} (list), found {found}"]
            out = []
            for i, item in enumerate(datum):
                out.extend(problems(schema["items"], item, f"{path}[{i}]"))
            return out
        return problems(kind, datum, path)
    if schema == "null":
        return [] if datum is None else [f"{path} expected null, found {found}"]
    if schema in INT_RANGES:
        if not isinstance(datum, int) or isinstance(datum, bool):
            return [f"{path} expected {schema} (int), found {found}"]
        low, high = INT_RANGES[schema]
        if not low <= datum <= high:
            return [f"{path} expected {schema} in [{low}, {high}], found an out-of-range int"]
        return []
    expected = _PY_TYPES.get(str(schema))
    if expected is not None and not isinstance(datum, expected):
        return [f"{path} expected {schema}, found {found}"]
    return []
