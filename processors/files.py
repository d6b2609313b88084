"""Reading the files users hand us (events, contacts): JSON Lines or CSV.

A bad line is reported with its number and reason and skipped; the rest of the file still
flows. Nothing here knows about Kafka, so ``produce``, ``backtest``, ``demo`` and
``contacts import`` share it.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from processors.core.events import ClickEvent, EventError, parse_csv_row, parse_event

T = TypeVar("T")


@dataclass
class LineErrors:
    """Collects bad lines; prints each one to stderr as ``FILE:LINE: reason``."""

    path: str
    echo: Callable[[str], None] | None = lambda msg: print(msg, file=sys.stderr)
    errors: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, reason: str) -> None:
        self.errors.append((line, reason))
        if self.echo:
            self.echo(f"{self.path}:{line}: skipped: {reason}")

    def __len__(self) -> int:
        return len(self.errors)


def is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def _is_utf8(*texts: str) -> bool:
    """False when decoding left surrogate escapes, i.e. the bytes were not UTF-8."""
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_float(value: Any) -> bool:
    """Does ``value`` hold a float, at any depth? (A loop, not ``any()``: once per line.)"""
    kind = type(value)
    if kind is dict:
        items: Iterable[Any] = value.values()
    elif kind is list:
        items = value
    else:
        return kind is float
    for item in items:
        kind = type(item)
        if kind is float or ((kind is dict or kind is list) and _has_float(item)):
            return True
    return False


def read_rows(path: Path, errors: LineErrors) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each record; undecodable lines go to ``errors``."""
    # utf-8-sig: spreadsheet tools start "CSV UTF-8" files with a byte-order mark, which would
    # otherwise become part of the first column's name (or make the first JSON line invalid).
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        if is_csv(path):
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                return
            if not _is_utf8(*reader.fieldnames):
                errors.add(1, "header is not valid UTF-8")
                return
            for row in reader:
                line = reader.line_num
                if None in row:
                    errors.add(line, "more cells than header columns")
                    continue
                if not _is_utf8(*(v for v in row.values() if isinstance(v, str))):
                    errors.add(line, "not valid UTF-8")
                    continue
                yield line, {k.strip(): v for k, v in row.items() if k is not None}
            return
        for number, raw in enumerate(fh, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            # orjson first: it refuses text that is not UTF-8 (surrogate escapes), so its success
            # spares that check. What it refuses or would read differently (bad JSON, NaN,
            # integers beyond 64 bits, read as floats) the standard library reads, after the
            # UTF-8 check: the same results and error messages as json.loads alone.
            obj: Any = None
            try:
                obj = orjson.loads(text)
                exact = not _has_float(obj)  # floats are rare in events: read them again
            except orjson.JSONDecodeError:
                exact = False
                if not _is_utf8(text):
                    errors.add(number, "not valid UTF-8")
                    continue
            if not exact:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    errors.add(number, f"not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
                except RecursionError:
                    errors.add(number, "not valid JSON (nested too deeply)")
                    continue
            if not isinstance(obj, dict):
                errors.add(number, "not a JSON object")
                continue
            yield number, obj


def read_parsed(
    path: Path, parse: Callable[[dict[str, Any]], T], errors: LineErrors
) -> Iterator[tuple[int, T]]:
    """Rows parsed by ``parse``; a ``ValueError`` from it is reported with the line number."""
    for line, obj in read_rows(path, errors):
        try:
            yield line, parse(obj)
        except ValueError as exc:
            errors.add(line, str(exc))


def read_events(path: Path, errors: LineErrors) -> Iterator[ClickEvent]:
    """Canonical events from JSON Lines or CSV (see ``processors.core.events``)."""
    parse: Callable[[dict[str, Any]], ClickEvent] = parse_csv_row if is_csv(path) else parse_event
    for _line, event in read_parsed(path, parse, errors):
        yield event


__all__ = ["EventError", "LineErrors", "read_events", "read_parsed", "read_rows"]
