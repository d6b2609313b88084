"""Confluent wire-format codec: round trips, pinned ids, typed errors, schema evolution."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryError

from schemas import load_schema
from schemas.codec import (
    MANIFEST,
    PINNED_IDS,
    AvroDecodeError,
    Codec,
    CodecError,
    NotWireFormat,
    RecordInvalid,
    UnknownRecordType,
    UnknownSchemaId,
    WrongRecordType,
    subject_for,
)

REPO = Path(__file__).resolve().parents[3]
TS = 1_700_000_000_123

RECORDS: dict[str, dict[str, Any]] = {
    "ClickEvent": {
        "event_id": "ev-1",
        "user_id": "u-42",
        "event_type": "add_to_cart",
        "ts": TS,
        "session_id": "sess-9",
        "properties": {"sku": "A-1", "value": "12.50", "name": "Café ☕"},
    },
    "ContactProfile": {
        "user_id": "u-42",
        "phone": "+447700900123",
        "consent": {"status": "opted_in", "at": TS - 5_000, "source": "checkout_form"},
        "timezone": "Europe/London",
        "first_name": "Zoë",
        "locale": "en-GB",
        "attributes": {"tier": "gold"},
    },
    "TriggerDecision": {
        "decision_id": "d-1",
        "campaign_id": "cart-abandon",
        "user_id": "u-42",
        "fire_at": TS + 1_800_000,
        "trigger_event_ids": ["ev-1", "ev-2"],
        "trigger_ts": TS,
        "variant": "B",
        "stage": "first",
        "priority": 5,
        "properties": {"sku": "A-1"},
        "clock": "event",
        "decided_at": TS + 7,
    },
    "DecisionCancelled": {
        "decision_id": "d-1",
        "campaign_id": "cart-abandon",
        "user_id": "u-42",
        "reason": "cancel_event",
        "at": TS + 60_000,
    },
    "SmsOutcome": {
        "decision_id": "d-1",
        "campaign_id": "cart-abandon",
        "user_id": "u-42",
        "status": "deferred",
        "reason": "quiet_hours",
        "at": TS + 1_800_001,
        "variant": "B",
        "message_id": "msg-77",
        "segments": 2,
        "encoding": "UCS-2",
        "price": "0.03330000",
        "rule": "daily",
        "due_at": TS + 36_000_000,
    },
    "DeliveryReceipt": {
        "receipt_id": "r-1",
        "decision_id": "d-1",
        "matched": True,
        "user_id": "u-42",
        "campaign_id": "cart-abandon",
        "variant": None,
        "status": "delivered",
        "final": True,
        "parts": 2,
        "delivered_parts": 2,
        "message_ids": ["m-1", "m-2"],
        "err_code": "0",
        "network_code": "23410",
        "price": "0.0333",
        "carrier_at": TS + 2_000_000,
        "received_at": TS + 2_000_100,
    },
    "InboundSms": {
        "message_id": "in-1",
        "user_id": "u-42",
        "msisdn": "447700900123",
        "to": "12345",
        "text": "Is it still in stock?",
        "type": "text",
        "keyword": "IS",
        "message_timestamp": TS,
        "received_at": TS + 10,
        "concat_ref": None,
        "concat_total": None,
        "concat_part": None,
    },
    "Conversion": {
        "conversion_id": "c-1",
        "event_id": "ev-9",
        "event_type": "purchase",
        "user_id": "u-42",
        "ts": TS + 3_600_000,
        "decision_id": "d-1",
        "campaign_id": "cart-abandon",
        "variant": "B",
        "holdout": False,
        "touch_at": TS + 1_800_000,
        "via": "send",
        "revenue": "12.50",
    },
}


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec("mock://test-codec")


def test_manifest_matches_schema_files() -> None:
    files = {p.stem for p in (REPO / "schemas").glob("*.avsc")}
    assert set(MANIFEST) == files
    assert MANIFEST[0] == "ClickEvent"  # design.md: ClickEvent = 1
    for name in MANIFEST:
        schema = load_schema(name)
        assert schema["name"] == name and schema["namespace"] == "nudgeflow"
        for field in schema["fields"]:
            assert field.get("doc"), f"{name}.{field['name']} has no doc"
            if isinstance(field["type"], list) and "null" in field["type"]:
                assert field.get("default", "missing") is None, f"{name}.{field['name']}"


@pytest.mark.parametrize("name", MANIFEST)
def test_round_trip_with_wire_header(codec: Codec, name: str) -> None:
    data = codec.encode(name, RECORDS[name])
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == PINNED_IDS[name] == codec.schema_id(name)
    found, record = codec.decode(data)
    assert (found, record) == (name, RECORDS[name])
    assert codec.decode_as(name, data) == RECORDS[name]


def test_timestamps_come_back_as_int_millis(codec: Codec) -> None:
    record = codec.decode_as("SmsOutcome", codec.encode("SmsOutcome", RECORDS["SmsOutcome"]))
    for field in ("at", "due_at"):
        assert type(record[field]) is int
    profile = codec.decode_as(
        "ContactProfile", codec.encode("ContactProfile", RECORDS["ContactProfile"])
    )
    assert type(profile["consent"]["at"]) is int


def test_defaults_fill_omitted_optional_fields(codec: Codec) -> None:
    minimal = {
        "decision_id": "d-2",
        "campaign_id": "c",
        "user_id": "u",
        "fire_at": TS,
        "trigger_event_ids": [],
        "trigger_ts": TS,
    }
    record = codec.decode_as("TriggerDecision", codec.encode("TriggerDecision", minimal))
    assert record == {
        **minimal,
        "variant": None,
        "stage": None,
        "priority": 0,
        "properties": {},
        "clock": "live",
        "decided_at": None,
    }


def test_accepts_bytearray_and_memoryview(codec: Codec) -> None:
    data = codec.encode("ClickEvent", RECORDS["ClickEvent"])
    assert codec.decode(bytearray(data)) == ("ClickEvent", RECORDS["ClickEvent"])
    assert codec.decode(memoryview(data)) == ("ClickEvent", RECORDS["ClickEvent"])


def test_separate_instances_and_processes_agree_on_ids() -> None:
    ids_a = {name: Codec("mock://a").schema_id(name) for name in MANIFEST}
    ids_b = {name: Codec("mock://b").schema_id(name) for name in MANIFEST}
    assert ids_a == ids_b == dict(PINNED_IDS)
    assert list(PINNED_IDS.values()) == list(range(1, len(MANIFEST) + 1))
    assert PINNED_IDS["ClickEvent"] == 1 and PINNED_IDS["SmsOutcome"] == 5  # never renumbered
    script = (
        "import json, sys\n"
        "from schemas.codec import Codec, MANIFEST\n"
        "c = Codec('mock://other-process')\n"
        "json.dump({n: c.schema_id(n) for n in MANIFEST}, sys.stdout)\n"
        "sys.stdout.buffer.flush()\n"
        "sys.stdout.write('\\n' + c.encode('ClickEvent', json.loads(sys.argv[1])).hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(RECORDS["ClickEvent"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    assert json.loads(out[0]) == ids_a
    # bytes written in another process decode here
    assert Codec("mock://c").decode(bytes.fromhex(out[1])) == ("ClickEvent", RECORDS["ClickEvent"])


def test_mock_registry_with_foreign_schemas_first_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If ids could not be the pinned ones, start-up must fail rather than mislabel messages."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    real_factory = SchemaRegistryClient.new_client

    def polluted(conf: dict[str, Any]) -> SchemaRegistryClient:
        client = real_factory(conf)
        client.register_schema("other", Schema('{"type":"string"}', schema_type="AVRO"))
        return client

    monkeypatch.setattr(SchemaRegistryClient, "new_client", staticmethod(polluted))
    with pytest.raises(RuntimeError, match="pinned id 1"):
        Codec("mock://polluted")


# -- bad bytes -------------------------------------------------------------------------------


def _body(codec: Codec) -> bytes:
    return codec.encode("ClickEvent", RECORDS["ClickEvent"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "found only 0 bytes"),
        (None, "found None"),
        (b"\x00\x00\x00", "found only 3 bytes"),
        (b'{"event_id": "x"}', "expected magic byte 0x00.*found 0x7b"),
        (b"\x01\x00\x00\x00\x01abc", "found 0x01"),
    ],
)
def test_not_wire_format(codec: Codec, data: bytes | None, match: str) -> None:
    with pytest.raises(NotWireFormat, match=match):
        codec.decode(data)


def test_unknown_schema_id(codec: Codec) -> None:
    data = b"\x00" + (4242).to_bytes(4, "big") + _body(codec)[5:]
    with pytest.raises(UnknownSchemaId, match="schema id 4242 is not registered"):
        codec.decode(data)
    with pytest.raises(UnknownSchemaId):  # negative cache answers the same
        codec.decode(data)


def test_truncated_body(codec: Codec) -> None:
    data = _body(codec)
    for cut in (5, 6, len(data) // 2, len(data) - 1):
        with pytest.raises(AvroDecodeError, match="truncated"):
            codec.decode(data[:cut])


def test_trailing_bytes(codec: Codec) -> None:
    with pytest.raises(AvroDecodeError, match="1 trailing bytes"):
        codec.decode(_body(codec) + b"\x00")


def test_garbage_body_only_raises_codec_errors(codec: Codec) -> None:
    import random

    rnd = random.Random(7)
    for _ in range(3000):
        schema_id = rnd.randint(1, len(MANIFEST))
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 48)))
        try:
            codec.decode(b"\x00" + schema_id.to_bytes(4, "big") + body)
        except CodecError:
            pass


def test_non_utf8_string_is_avro_decode_error(codec: Codec) -> None:
    body = BytesIO()
    body.write(b"\x00" + PINNED_IDS["DecisionCancelled"].to_bytes(4, "big"))
    body.write(b"\x04\xff\xfe")  # decision_id: 2 bytes, not UTF-8
    fastavro.schemaless_writer(
        body,
        fastavro.parse_schema(
            {
                "type": "record",
                "name": "Rest",
                "fields": [{"name": n, "type": "string"} for n in ("c", "u", "r")]
                + [{"name": "at", "type": "long"}],
            }
        ),
        {"c": "c", "u": "u", "r": "r", "at": TS},
    )
    with pytest.raises(AvroDecodeError, match="not valid UTF-8") as info:
        codec.decode(body.getvalue())
    assert not isinstance(info.value, UnicodeDecodeError)


def test_decode_as_wrong_type(codec: Codec) -> None:
    data = codec.encode("DecisionCancelled", RECORDS["DecisionCancelled"])
    with pytest.raises(WrongRecordType, match="expected a TriggerDecision record, found Decision"):
        codec.decode_as("TriggerDecision", data)


# -- bad records -----------------------------------------------------------------------------


def test_missing_required_field_is_record_invalid(codec: Codec) -> None:
    record = {k: v for k, v in RECORDS["ClickEvent"].items() if k != "user_id"}
    with pytest.raises(RecordInvalid, match=r"ClickEvent\.user_id is required"):
        codec.encode("ClickEvent", record)


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("ClickEvent", {"ts": "2024-01-01"}, r"ts expected long \(int\), found str"),
        ("ClickEvent", {"typo_field": "x"}, "fields not in the schema: typo_field"),
        ("ClickEvent", {"properties": {"qty": 3}}, r"properties\['qty'\] expected string"),
        ("TriggerDecision", {"priority": 2**40}, "priority expected int in"),
        ("ContactProfile", {"consent": {"at": TS}}, r"consent\.status is required"),
        ("SmsOutcome", {"segments": "2"}, "segments expected null or int, found str"),
    ],
)
def test_wrong_field_types_are_record_invalid(
    codec: Codec, name: str, change: dict[str, Any], match: str
) -> None:
    with pytest.raises(RecordInvalid, match=match):
        codec.encode(name, {**RECORDS[name], **change})


@pytest.mark.parametrize(
    "record",
    [
        RECORDS["SmsOutcome"],
        {**RECORDS["SmsOutcome"], "segments": 2**31 - 1, "at": -(2**63), "reason": "é" * 70},
        {**RECORDS["SmsOutcome"], "segments": -64, "price": "", "due_at": 63, "rule": "x" * 64},
        {"decision_id": "d", "campaign_id": "c", "user_id": "u", "status": "sent", "at": 0},
    ],
)
def test_fast_flat_writer_writes_fastavros_bytes(codec: Codec, record: dict[str, Any]) -> None:
    """SmsOutcome takes the plain-Python writer (flat records): byte for byte fastavro's."""
    buf = BytesIO()
    stripped = {
        **load_schema("SmsOutcome"),
        "fields": [
            {**f, "type": "long"} if f["name"] == "at" else f
            for f in load_schema("SmsOutcome")["fields"]
        ],
    }
    fastavro.schemaless_writer(buf, fastavro.parse_schema(stripped), record)
    assert codec.encode("SmsOutcome", record)[5:] == buf.getvalue()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"at": 2**63}, r"at expected long in"),
        ({"at": True}, r"at expected long \(int\), found bool"),
        ({"reason": b"x"}, r"reason expected null or string, found bytes"),
        ({"status": None}, r"status expected string, found NoneType"),
        ({"extra": 1}, "fields not in the schema: extra"),
    ],
)
def test_fast_flat_writer_leaves_bad_records_to_fastavro(
    codec: Codec, change: dict[str, Any], match: str
) -> None:
    with pytest.raises(RecordInvalid, match=match):
        codec.encode("SmsOutcome", {**RECORDS["SmsOutcome"], **change})
    missing = {k: v for k, v in RECORDS["SmsOutcome"].items() if k != "user_id"}
    with pytest.raises(RecordInvalid, match=r"SmsOutcome\.user_id is required"):
        codec.encode("SmsOutcome", missing)


def test_record_invalid_does_not_echo_values(codec: Codec) -> None:
    record = {**RECORDS["ContactProfile"], "phone": 447700900123}
    with pytest.raises(RecordInvalid) as info:
        codec.encode("ContactProfile", record)
    assert "447700900123" not in str(info.value)
    assert "phone expected string, found int" in str(info.value)


def test_unknown_record_type(codec: Codec) -> None:
    with pytest.raises(UnknownRecordType, match="expected one of ClickEvent"):
        codec.encode("Nope", {})
    with pytest.raises(UnknownRecordType):
        codec.decode_as("Nope", _body(codec))


# -- schema evolution ------------------------------------------------------------------------


def _register_writer(codec: Codec, schema: dict[str, Any]) -> int:
    subject = subject_for(schema["name"])
    return int(codec.registry.register_schema(subject, Schema(json.dumps(schema), "AVRO")))


def _wire(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def test_reader_decodes_older_writer_schema() -> None:
    codec = Codec("mock://evolution-old")
    old = load_schema("ClickEvent")
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("session_id", "properties")]
    old_id = _register_writer(codec, old)
    assert old_id not in PINNED_IDS.values()
    record = {"event_id": "e", "user_id": "u", "event_type": "view", "ts": TS}
    name, decoded = codec.decode(_wire(old_id, old, record))
    assert name == "ClickEvent"
    assert decoded == {**record, "session_id": None, "properties": {}}
    assert type(decoded["ts"]) is int


def test_reader_decodes_newer_writer_schema_dropping_unknown_fields() -> None:
    codec = Codec("mock://evolution-new")
    new = load_schema("DecisionCancelled")
    new["fields"].append({"name": "actor", "type": "string", "default": "engine"})
    new_id = _register_writer(codec, new)
    record = {**RECORDS["DecisionCancelled"], "actor": "ops"}
    assert (
        codec.decode_as("DecisionCancelled", _wire(new_id, new, record))
        == RECORDS["DecisionCancelled"]
    )


def test_incompatible_writer_schema_is_avro_decode_error() -> None:
    codec = Codec("mock://evolution-bad")
    bad = {
        "type": "record",
        "name": "DecisionCancelled",
        "namespace": "nudgeflow",
        "fields": [{"name": "decision_id", "type": "string"}],
    }
    bad_id = _register_writer(codec, bad)
    with pytest.raises(AvroDecodeError, match="cannot be read as the current DecisionCancelled"):
        codec.decode(_wire(bad_id, bad, {"decision_id": "d"}))


def test_schema_id_of_a_foreign_record_is_unknown() -> None:
    codec = Codec("mock://foreign")
    foreign = {"type": "record", "name": "Order", "namespace": "shop", "fields": []}
    foreign_id = int(codec.registry.register_schema("shop.Order", Schema(json.dumps(foreign))))
    with pytest.raises(UnknownSchemaId, match="schema id 9 is shop.Order, expected one of"):
        codec.decode(_wire(foreign_id, foreign, {}))


# -- http registry (a minimal stand-in for the Confluent REST API on loopback) ---------------


class _FakeRegistry(BaseHTTPRequestHandler):
    schemas: dict[int, str] = {}
    subjects: dict[tuple[str, str], int] = {}
    read_only = False
    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        path = self.path.split("?")[0]
        if path.startswith("/schemas/ids/"):
            schema_id = int(path.rsplit("/", 1)[1])
            if schema_id in self.schemas:
                return self._reply(200, {"schema": self.schemas[schema_id]})
            return self._reply(404, {"error_code": 40403, "message": "Schema not found"})
        self._reply(404, {"error_code": 404, "message": "not found"})

    def do_POST(self) -> None:
        self.requests.append(f"POST {self.path}")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = self.path.split("?")[0].strip("/").split("/")
        subject = parts[1]
        key = (subject, body["schema"])
        if parts[-1] == "versions":  # register
            if self.read_only:
                return self._reply(403, {"error_code": 40301, "message": "read-only"})
            if key not in self.subjects:
                schema_id = 100 + len(self.schemas)
                self.schemas[schema_id] = body["schema"]
                self.subjects[key] = schema_id
            return self._reply(200, {"id": self.subjects[key]})
        if key in self.subjects:  # lookup
            schema_id = self.subjects[key]
            return self._reply(200, {"id": schema_id, "subject": subject, "version": 1, **body})
        self._reply(404, {"error_code": 40403, "message": "Schema not found"})


@pytest.fixture()
def http_registry() -> Iterator[str]:
    _FakeRegistry.schemas, _FakeRegistry.subjects = {}, {}
    _FakeRegistry.read_only, _FakeRegistry.requests = False, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_registry_registers_lazily_and_resolves_by_id(http_registry: str) -> None:
    writer = Codec(http_registry)
    assert _FakeRegistry.requests == []  # nothing registered until first use
    data = writer.encode("TriggerDecision", RECORDS["TriggerDecision"])
    assert _FakeRegistry.requests == [
        "POST /subjects/nudgeflow.TriggerDecision/versions?normalize=False"
    ]
    assert int.from_bytes(data[1:5], "big") == writer.schema_id("TriggerDecision") == 100
    registered = json.loads(_FakeRegistry.schemas[100])
    assert registered["fields"][3]["type"]["logicalType"] == "timestamp-millis"

    reader = Codec(http_registry)  # another process: fetches the writer schema by id once
    for _ in range(3):
        assert reader.decode(data) == ("TriggerDecision", RECORDS["TriggerDecision"])
    assert _FakeRegistry.requests.count("GET /schemas/ids/100") == 1
    with pytest.raises(UnknownSchemaId, match="schema id 7 is not registered"):
        reader.decode(b"\x00\x00\x00\x00\x07\x00")


def test_http_registry_read_only_falls_back_to_lookup(http_registry: str) -> None:
    Codec(http_registry).schema_id("SmsOutcome")  # pre-registered by a deploy step
    _FakeRegistry.read_only = True
    codec = Codec(http_registry)
    assert codec.schema_id("SmsOutcome") == 100
    with pytest.raises(SchemaRegistryError, match="read-only"):  # absent and may not register
        codec.schema_id("ClickEvent")


def _fastavro_schema(name: str) -> Any:
    from schemas.codec import _strip_time_logical_types

    return fastavro.parse_schema(_strip_time_logical_types(load_schema(name)))


def _random_value(rnd: Any, kind: Any) -> Any:
    if isinstance(kind, list):
        return None if rnd.random() < 0.4 else _random_value(rnd, kind[1 - kind.index("null")])
    if isinstance(kind, dict):
        if kind["type"] == "array":
            return [_random_value(rnd, "string") for _ in range(rnd.choice((0, 1, 2, 70)))]
        if kind["type"] == "map":
            return {_random_value(rnd, "string"): "v" * rnd.randint(0, 80) for _ in range(3)}
        kind = kind["type"]
    if kind == "string":
        return "".join(
            rnd.choice('aé\u20ac\U0001f600"\\\x00') for _ in range(rnd.choice((0, 1, 63, 64, 200)))
        )
    limit = 2**31 if kind == "int" else 2**63
    return rnd.choice((0, -1, 63, 64, -65, limit - 1, -limit, rnd.randint(-limit, limit - 1)))


def test_flat_reader_reads_what_fastavro_reads(codec: Codec) -> None:
    """The plain-Python reader (flat records, arrays and maps of strings): fastavro's dict."""
    import random

    from schemas.codec import _strip_time_logical_types
    from schemas.flat import flat_reader

    rnd = random.Random(3)
    names = [n for n in MANIFEST if flat_reader(_strip_time_logical_types(load_schema(n)))]
    assert {"TriggerDecision", "DecisionCancelled", "SmsOutcome"} <= set(names)
    for name in names:
        schema = _fastavro_schema(name)
        for _ in range(60):
            record = {f["name"]: _random_value(rnd, f["type"]) for f in load_schema(name)["fields"]}
            buf = BytesIO()
            buf.write(b"\x00" + PINNED_IDS[name].to_bytes(4, "big"))
            fastavro.schemaless_writer(buf, schema, record)
            data = buf.getvalue()
            expected = fastavro.schemaless_reader(BytesIO(data[5:]), schema)
            fast = codec._flat_readers[name](data)
            assert fast == expected and list(fast) == list(expected)
            assert codec.decode(data) == (name, expected)


def test_flat_reader_reads_blocks_with_sizes_and_leaves_bad_bodies_to_fastavro(
    codec: Codec,
) -> None:
    """Negative block counts (a block with its byte size) read as fastavro does; a bad union
    index or an int out of range is fastavro's to judge (same errors as before)."""
    head = b"\x00" + PINNED_IDS["TriggerDecision"].to_bytes(4, "big")
    strings = b"".join(b"\x02" + c for c in (b"d", b"c", b"u"))
    # fire_at 1, trigger_event_ids: one block of -2 items (4 bytes), then end; trigger_ts 1
    body = strings + b"\x02" + b"\x03\x08" + b"\x02a\x02b" + b"\x00" + b"\x02"
    # variant null, stage "s", priority 5, properties: -1 item block, clock "x", decided_at 2
    body += b"\x00" + b"\x02\x02s" + b"\x0a" + b"\x01\x06\x02k\x02v\x00" + b"\x02x" + b"\x02\x04"
    schema = _fastavro_schema("TriggerDecision")
    expected = fastavro.schemaless_reader(BytesIO(body), schema)
    assert expected["trigger_event_ids"] == ["a", "b"] and expected["properties"] == {"k": "v"}
    assert codec._flat_readers["TriggerDecision"](head + body) == expected
    assert codec.decode(head + body) == ("TriggerDecision", expected)
    bad_union = body.replace(b"\x02\x02s\x0a", b"\x04\x02s\x0a")
    assert codec._flat_readers["TriggerDecision"](head + bad_union) is None
    with pytest.raises(AvroDecodeError):
        codec.decode(head + bad_union)
    assert codec._flat_readers["TriggerDecision"](head + body + b"\x00") is None
    with pytest.raises(AvroDecodeError, match="trailing"):
        codec.decode(head + body + b"\x00")


def test_flat_writer_writes_fastavros_bytes_for_every_schema_it_takes() -> None:
    """Arrays and maps of strings, nullable fields and fields left out for their default
    (``TriggerDecision``, ``ClickEvent``, ...): byte for byte what fastavro writes."""
    import random

    from schemas.codec import _strip_time_logical_types
    from schemas.flat import flat_writer

    rnd = random.Random(7)

    def text() -> str:
        return rnd.choice(["", "a", "é" * rnd.randint(0, 70), "x" * rnd.randint(60, 200)])

    def value(kind: Any) -> Any:
        if isinstance(kind, list):
            return None if rnd.random() < 0.3 else value([k for k in kind if k != "null"][0])
        if isinstance(kind, dict):
            if kind["type"] == "array":
                return [text() for _ in range(rnd.randint(0, 70))]
            if kind["type"] == "map":
                return {f"{text()}{i}": text() for i in range(rnd.randint(0, 70))}
            kind = kind["type"]
        if kind == "string":
            return text()
        bound = 2**31 if kind == "int" else 2**63
        return rnd.choice(
            [0, 1, -1, 63, 64, -64, -65, bound - 1, -bound, 1_700_000_000_000 % bound]
        )

    taken = []
    for name in MANIFEST:
        schema = _strip_time_logical_types(load_schema(name))
        write = flat_writer(schema)
        if write is None:
            continue
        taken.append(name)
        parsed = fastavro.parse_schema(schema)
        for _ in range(300):
            record = {
                f["name"]: value(f["type"])
                for f in schema["fields"]
                if "default" not in f or rnd.random() < 0.7
            }
            buf = BytesIO()
            fastavro.schemaless_writer(buf, parsed, record, strict_allow_default=True)
            assert write(record, b"") == buf.getvalue(), (name, record)
    assert {"TriggerDecision", "ClickEvent", "DecisionCancelled", "SmsOutcome"} <= set(taken)


@pytest.mark.parametrize(
    "change",
    [
        {"trigger_event_ids": ["e", 1]},
        {"properties": {"k": 1}},
        {"properties": [("k", "v")]},
        {"priority": None},
        {"clock": None},
    ],
)
def test_flat_writer_leaves_what_it_cannot_write_exactly_to_fastavro(
    codec: Codec, change: dict[str, Any]
) -> None:
    record = {**RECORDS["TriggerDecision"], **change}
    assert codec._flat["TriggerDecision"](record, b"") is None
    with pytest.raises(RecordInvalid):
        codec.encode("TriggerDecision", record)
