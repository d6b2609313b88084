"""NudgeFlow's Avro schemas (namespace ``nudgeflow``), one record per ``<Name>.avsc`` file.

This package only locates and loads the schema files, so importing it stays cheap and free of
Kafka dependencies; the Confluent wire-format codec lives in :mod:`schemas.codec`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent
NAMESPACE = "nudgeflow"


def schema_path(name: str) -> Path:
    """Path of the ``.avsc`` file of record ``name`` (e.g. ``"ClickEvent"``)."""
    return SCHEMA_DIR / f"{name}.avsc"


def load_schema(name: str) -> dict[str, Any]:
    """The schema of record ``name`` as JSON, exactly as written in its ``.avsc`` file."""
    path = schema_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))
        raise KeyError(f"no schema file for record {name!r}; known records: {', '.join(known)}")
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


__all__ = ["NAMESPACE", "SCHEMA_DIR", "load_schema", "schema_path"]
