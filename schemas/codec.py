"""Confluent wire-format Avro codec: ``0x00`` + 4-byte big-endian schema id + schemaless body.

One ``Codec`` per process serves every record type of :data:`MANIFEST`. Error policy:

* :class:`CodecError` (a ``ValueError``) means *this message or record is bad*: dead-letter it.
* Anything else (``SchemaRegistryError``, network errors) is infrastructure: retry, don't DLQ.

Timestamps (``timestamp-millis``) travel as plain ``int`` epoch milliseconds in both directions:
the codec hands fastavro copies of the schemas without those logical-type annotations (the
binary encoding is the same ``long``), so reads give ints, not datetimes, and writes skip the
datetime conversion step. The registry still gets the annotated schemas.

On ``mock://`` URLs (the embedded stack) the codec registers :data:`MANIFEST` in order at
start-up and checks that the ids equal :data:`PINNED_IDS`, so every process agrees on them
without a registry server. On ``http(s)://`` URLs each schema is registered (or looked up) under
subject ``nudgeflow.<Name>`` on first encode, and writer schemas are fetched by id on first
decode and resolved to the current reader schema (schema evolution).
"""

from __future__ import annotations

import copy
import json
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast
from urllib.parse import urlsplit

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from schemas import NAMESPACE, flat, load_schema
from schemas.flat import FlatReader, FlatWriter, flat_reader, flat_writer, int_fields
from schemas.record_check import problems

MANIFEST: tuple[str, ...] = (
    "ClickEvent",
    "ContactProfile",
    "TriggerDecision",
    "DecisionCancelled",
    "SmsOutcome",
    "DeliveryReceipt",
    "InboundSms",
    "Conversion",
)
"""Fixed registration order; on a ``mock://`` registry the id of ``MANIFEST[i]`` is ``i + 1``."""

PINNED_IDS: Mapping[str, int] = {name: i + 1 for i, name in enumerate(MANIFEST)}
"""Schema ids every process gets on a ``mock://`` registry."""

SUBJECT_PREFIX = f"{NAMESPACE}."
MAGIC_BYTE = 0
HEADER_SIZE = flat.HEADER_SIZE
_HEADER = struct.Struct(">BI")  # magic byte, big-endian schema id

# Logical types that fastavro would turn into datetime/date/time objects on read.
_TIME_LOGICAL_TYPES = frozenset(
    {
        "timestamp-millis",
        "timestamp-micros",
        "local-timestamp-millis",
        "local-timestamp-micros",
        "date",
        "time-millis",
        "time-micros",
    }
)
_MAX_UNKNOWN_IDS = 4096


class CodecError(ValueError):
    """A message or record cannot be encoded/decoded; the data is bad, not the infrastructure."""


class NotWireFormat(CodecError):
    """Bytes are empty, shorter than the 5-byte header, or do not start with magic byte 0."""


class UnknownSchemaId(CodecError):
    """The schema id in the header is not registered, or is not a NudgeFlow record."""


class AvroDecodeError(CodecError):
    """The Avro body is truncated, garbage, has trailing bytes or holds non-UTF-8 strings."""


class RecordInvalid(CodecError):
    """A dict given to ``encode`` does not match the record's schema."""


class UnknownRecordType(CodecError):
    """A record name that is not in :data:`MANIFEST`."""


class WrongRecordType(CodecError):
    """``decode_as`` found a different record type than the one asked for."""


def subject_for(name: str) -> str:
    """Registry subject of a record (record-name strategy): ``nudgeflow.<Name>``."""
    return SUBJECT_PREFIX + name


def _strip_time_logical_types(node: Any) -> Any:
    """Copy of a schema without time logical types, so fastavro reads/writes plain ints."""
    if isinstance(node, list):
        return [_strip_time_logical_types(item) for item in node]
    if isinstance(node, dict):
        return {
            key: _strip_time_logical_types(value)
            for key, value in node.items()
            if not (key == "logicalType" and value in _TIME_LOGICAL_TYPES)
        }
    return node


def _full_name(schema: Mapping[str, Any]) -> str:
    name = str(schema.get("name", ""))
    if "." in name:
        return name
    namespace = schema.get("namespace")
    return f"{namespace}.{name}" if namespace else name


@dataclass(frozen=True, slots=True)
class _Reader:
    """How to read one schema id: the writer schema and, if it differs, our reader schema."""

    name: str
    schema_id: int
    writer: Any
    reader: Any  # None when writer == reader: no resolution step on the hot path


class Codec:
    """Encodes and decodes NudgeFlow records in the Confluent wire format.

    ``registry_url`` is ``mock://<anything>`` for the embedded stack or ``http(s)://...`` for a
    real Schema Registry; ``registry_conf`` adds client settings such as
    ``basic.auth.user.info``. Thread-safe; the hot paths take no lock.
    """

    def __init__(self, registry_url: str, registry_conf: Mapping[str, Any] | None = None) -> None:
        if not registry_url.startswith(("mock://", "http://", "https://")):
            scheme = registry_url.split("://", 1)[0] if "://" in registry_url else None
            raise ValueError(
                "schema registry URL must start with mock://, http:// or https://, found "
                + (f"scheme {scheme!r}" if scheme else "no scheme")
            )
        self._url = registry_url
        # For messages: a registry URL may carry user:password@ credentials.
        parts = urlsplit(registry_url)
        self._safe_url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        self._mock = registry_url.startswith("mock://")
        conf = {**(registry_conf or {}), "url": registry_url}
        # Recent confluent-kafka returns the mock client only from the new_client() factory.
        factory = getattr(SchemaRegistryClient, "new_client", None)
        self._registry: SchemaRegistryClient = (
            factory(conf) if factory else SchemaRegistryClient(conf)
        )
        self._lock = threading.Lock()
        self._source: dict[str, dict[str, Any]] = {}
        self._schema_str: dict[str, str] = {}
        self._parsed: dict[str, Any] = {}
        self._canonical: dict[str, str] = {}
        self._by_full_name: dict[str, str] = {}
        self._int_fields: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._flat: dict[str, FlatWriter] = {}
        self._flat_readers: dict[str, FlatReader] = {}
        for name in MANIFEST:
            source = load_schema(name)
            stripped = _strip_time_logical_types(source)
            self._source[name] = source
            self._schema_str[name] = json.dumps(source, separators=(",", ":"), sort_keys=True)
            self._parsed[name] = parse_schema(copy.deepcopy(stripped))
            self._canonical[name] = to_parsing_canonical_form(stripped)
            self._by_full_name[_full_name(source)] = name
            self._int_fields[name] = int_fields(stripped)
            flat = flat_writer(stripped)
            if flat is not None:
                self._flat[name] = flat
            reader = flat_reader(stripped)
            if reader is not None:
                self._flat_readers[name] = reader
        self._ids: dict[str, int] = {}
        self._headers: dict[str, bytes] = {}
        self._readers: dict[int, _Reader] = {}
        self._unknown_ids: set[int] = set()
        if self._mock:
            for name in MANIFEST:
                schema_id = self._register(name)
                if schema_id != PINNED_IDS[name]:
                    raise RuntimeError(
                        f"mock registry {self._safe_url} gave {name} schema id {schema_id}, "
                        f"expected pinned id {PINNED_IDS[name]}: something registered schemas on "
                        f"this client before the codec, so ids would differ between processes"
                    )

    @property
    def registry(self) -> SchemaRegistryClient:
        """The underlying registry client (tests use it to register older writer schemas)."""
        return self._registry

    @property
    def registry_url(self) -> str:
        """The registry URL without credentials, safe to log."""
        return self._safe_url

    def schema(self, name: str) -> dict[str, Any]:
        """The schema of record ``name`` as registered (with logical types); a copy."""
        return copy.deepcopy(self._source[self._check_name(name)])

    def schema_id(self, name: str) -> int:
        """Registry id of the current schema of ``name``; registers it on first use (http)."""
        schema_id = self._ids.get(name)
        if schema_id is None:
            schema_id = self._register(self._check_name(name))
        return schema_id

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Wire-format bytes of ``record`` as a ``name`` record.

        Fields with a schema default may be left out; unknown fields are rejected so a typo
        cannot silently drop data. Raises :class:`RecordInvalid` on a mismatch.
        """
        header = self._headers.get(name)
        if header is None:
            self.schema_id(name)
            header = self._headers[name]
        flat = self._flat.get(name)
        if flat is not None:
            try:
                data = flat(record, header)
            except Exception:  # noqa: BLE001 - e.g. a lone surrogate: fastavro decides below
                data = None
            if data is not None:
                return data
        buf = BytesIO()
        buf.write(header)
        try:
            # fastavro silently truncates floats and writes out-of-range ints; check top-level
            # int/long fields ourselves (a few type checks, cheap next to the write itself).
            for field, low, high in self._int_fields[name]:
                value = record.get(field)
                if value is not None and (type(value) is not int or not low <= value <= high):
                    raise ValueError(f"field {field} is not an Avro int/long")
            schemaless_writer(buf, self._parsed[name], record, strict_allow_default=True)
        except Exception as exc:  # fastavro raises TypeError/ValueError/OverflowError/...
            raise RecordInvalid(self._explain(name, record, exc)) from exc
        return buf.getvalue()

    def decode(self, data: bytes | bytearray | memoryview | None) -> tuple[str, dict[str, Any]]:
        """Record name (e.g. ``"ClickEvent"``) and record dict of wire-format bytes."""
        try:
            magic, schema_id = _HEADER.unpack_from(data)  # type: ignore[arg-type]
        except (struct.error, TypeError):
            raise NotWireFormat(self._describe_short(data)) from None
        if magic != MAGIC_BYTE:
            raise NotWireFormat(self._describe_magic(magic))
        payload = cast(bytes, data)  # unpack_from accepted it, so it is a buffer
        reader = self._readers.get(schema_id)
        if reader is None:
            reader = self._load_reader(schema_id)
        if reader.reader is None and type(payload) is bytes:
            flat = self._flat_readers.get(reader.name)
            if flat is not None:
                try:
                    fast = flat(payload)
                except Exception:  # noqa: BLE001 - a bad body: fastavro reads it or raises below
                    fast = None
                if fast is not None:
                    return reader.name, fast
        buf = BytesIO(payload)
        buf.seek(HEADER_SIZE)
        try:
            record = schemaless_reader(buf, reader.writer, reader.reader)
        except UnicodeDecodeError as exc:
            raise AvroDecodeError(
                f"schema id {schema_id} ({reader.name}): a string field holds bytes that are not "
                f"valid UTF-8 ({exc.reason} at byte {exc.start} of the string)"
            ) from None
        except Exception as exc:  # truncated or garbage body: EOFError, IndexError, ...
            raise AvroDecodeError(self._describe_body_error(reader, len(payload), exc)) from None
        end = buf.tell()
        if end != len(payload):
            raise AvroDecodeError(
                f"schema id {schema_id} ({reader.name}): expected the record to end the message "
                f"at byte {end}, found {len(payload) - end} trailing bytes (wrong schema id?)"
            )
        return reader.name, cast(dict[str, Any], record)

    def decode_as(self, name: str, data: bytes | bytearray | memoryview | None) -> dict[str, Any]:
        """Decode ``data`` and insist that it is a ``name`` record."""
        self._check_name(name)
        found, record = self.decode(data)
        if found != name:
            raise WrongRecordType(f"expected a {name} record, found {found}")
        return record

    # -- registration and writer-schema lookup (cold paths) -------------------------------------

    def _check_name(self, name: str) -> str:
        if name not in self._parsed:
            raise UnknownRecordType(
                f"unknown record type {name!r}; expected one of {', '.join(MANIFEST)}"
            )
        return name

    def _register(self, name: str) -> int:
        with self._lock:
            schema_id = self._ids.get(name)
            if schema_id is not None:
                return schema_id
            subject = subject_for(name)
            schema = Schema(self._schema_str[name], schema_type="AVRO")
            try:
                schema_id = int(self._registry.register_schema(subject, schema))
            except SchemaRegistryError as exc:
                # Registration may be forbidden in production (pre-registered schemas only).
                try:
                    found = self._registry.lookup_schema(subject, schema).schema_id
                    if found is None:
                        raise
                    schema_id = int(found)
                except SchemaRegistryError as lookup_exc:
                    raise exc from lookup_exc
            self._readers[schema_id] = _Reader(name, schema_id, self._parsed[name], None)
            self._headers[name] = _HEADER.pack(MAGIC_BYTE, schema_id)
            self._ids[name] = schema_id
            return schema_id

    def _load_reader(self, schema_id: int) -> _Reader:
        with self._lock:
            reader = self._readers.get(schema_id)
            if reader is not None:
                return reader
            if schema_id in self._unknown_ids:
                raise UnknownSchemaId(self._describe_unknown(schema_id))
            reader = self._fetch_reader(schema_id)
            self._readers[schema_id] = reader
            return reader

    def _fetch_reader(self, schema_id: int) -> _Reader:
        """Fetch the writer schema of ``schema_id``; caller holds the lock."""
        try:
            registered = self._registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code != 404:
                raise  # registry trouble, not bad data: let the caller retry
            if len(self._unknown_ids) < _MAX_UNKNOWN_IDS:
                self._unknown_ids.add(schema_id)
            raise UnknownSchemaId(self._describe_unknown(schema_id)) from None
        if registered.schema_type not in (None, "AVRO"):
            raise UnknownSchemaId(
                f"schema id {schema_id} is a {registered.schema_type} schema, expected AVRO"
            )
        try:
            writer_json = _strip_time_logical_types(json.loads(registered.schema_str or ""))
            full_name = _full_name(writer_json) if isinstance(writer_json, dict) else ""
            name = self._by_full_name.get(full_name)
            if name is None:
                raise UnknownSchemaId(
                    f"schema id {schema_id} is {full_name or 'not a named record'}, expected one "
                    f"of {', '.join(self._by_full_name)}"
                )
            canonical = to_parsing_canonical_form(writer_json)
            writer = parse_schema(writer_json)
        except CodecError:
            raise
        except Exception as exc:
            raise UnknownSchemaId(
                f"schema id {schema_id} is not a valid Avro schema: {type(exc).__name__}: {exc}"
            ) from None
        if canonical == self._canonical[name]:
            return _Reader(name, schema_id, self._parsed[name], None)
        return _Reader(name, schema_id, writer, self._parsed[name])

    # -- error messages -------------------------------------------------------------------------

    @staticmethod
    def _describe_short(data: object) -> str:
        expected = "expected Confluent wire format (magic byte 0, 4-byte schema id, Avro body)"
        if data is None:
            return f"{expected}, found None (a tombstone?)"
        if not isinstance(data, bytes | bytearray | memoryview):
            return f"{expected}, found {type(data).__name__}"
        return f"{expected}, found only {len(data)} bytes"

    @staticmethod
    def _describe_magic(first: int) -> str:
        hint = ""
        if first in (ord("{"), ord("[")):
            hint = " (looks like JSON)"
        elif 32 <= first < 127:
            hint = " (looks like text)"
        return f"expected magic byte 0x00 of the Confluent wire format, found 0x{first:02x}{hint}"

    def _describe_unknown(self, schema_id: int) -> str:
        known = ", ".join(f"{n}={i}" for n, i in self._ids.items())
        return f"schema id {schema_id} is not registered in {self._safe_url} (known: {known})"

    @staticmethod
    def _describe_body_error(reader: _Reader, size: int, exc: Exception) -> str:
        what = f"schema id {reader.schema_id} ({reader.name})"
        if isinstance(exc, EOFError):
            return f"{what}: body ends early, the {size}-byte message is truncated"
        if type(exc).__name__ == "SchemaResolutionError":
            return f"{what}: writer schema cannot be read as the current {reader.name}: {exc}"
        return f"{what}: body is not a valid {reader.name} ({type(exc).__name__}: {exc})"

    def _explain(self, name: str, record: object, exc: Exception) -> str:
        """Say which field is wrong and what type it has, without echoing values (may be PII)."""
        found = problems(self._source[name], record, name)
        if found:
            return f"invalid {name} record: " + "; ".join(found[:5])
        return f"invalid {name} record: {type(exc).__name__}: {exc}"


__all__ = [
    "MANIFEST",
    "PINNED_IDS",
    "SUBJECT_PREFIX",
    "AvroDecodeError",
    "Codec",
    "CodecError",
    "NotWireFormat",
    "RecordInvalid",
    "UnknownRecordType",
    "UnknownSchemaId",
    "WrongRecordType",
    "subject_for",
]
