"""Gateways: the outbox JSON Lines record; Vonage through the real SDK to a local HTTPS fake."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from processors.core.events import iso_ms
from processors.gateways import (
    AmbiguousGatewayError,
    Gateway,
    GatewayError,
    PermanentGatewayError,
    RetryableGatewayError,
    SmsMessage,
)
from processors.gateways.base import VONAGE_STATUSES
from processors.gateways.outbox import OutboxGateway
from processors.gateways.vonage import VonageGateway
from tests.fakes.vonage_fake import Blackhole, VonageFake, message_parts

PHONE = "+447700900123"
TEXT = "Your cart misses you: 2 items left"


def make_msg(i: int = 0, **overrides: object) -> SmsMessage:
    fields: dict[str, object] = {
        "decision_id": f"dec-{i:04d}",
        "campaign_id": "cart-recovery",
        "user_id": f"u{i}",
        "to": PHONE,
        "text": TEXT,
        "sent_at_ms": 1_700_000_000_123 + i,
        "segments": 1,
        "encoding": "GSM-7",
    }
    fields.update(overrides)
    return SmsMessage(**fields)  # type: ignore[arg-type]


def leaks(exc: BaseException, *needles: str) -> list[str]:
    """Which needles appear in the exception's str, repr or full formatted traceback."""
    rendered = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    return [n for n in needles if n in rendered]


# --------------------------------------------------------------------------------------------
# Outbox


def test_iso_ms_is_exact_utc_with_z() -> None:
    assert iso_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert iso_ms(1_700_000_000_999) == "2023-11-14T22:13:20.999Z"
    assert iso_ms(0) == "1970-01-01T00:00:00Z"


def test_outbox_writes_documented_json_lines_and_echo_hides_number(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "outbox.jsonl"
    echoed: list[str] = []
    gw = OutboxGateway(path, echo=echoed.append)
    assert isinstance(gw, Gateway)
    r1 = gw.send(make_msg(1))
    r2 = gw.send(make_msg(2, text="Hé ✓ two\nlines", segments=2, encoding="UCS-2"))
    gw.close()

    assert (r1.message_id, r2.message_id) == ("outbox-1", "outbox-2")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "decision_id": "dec-0001",
            "campaign_id": "cart-recovery",
            "user_id": "u1",
            "to": PHONE,
            "text": TEXT,
            "sent_at": "2023-11-14T22:13:20.124Z",
            "segments": 1,
            "encoding": "GSM-7",
        },
        {
            "decision_id": "dec-0002",
            "campaign_id": "cart-recovery",
            "user_id": "u2",
            "to": PHONE,
            "text": "Hé ✓ two\nlines",
            "sent_at": "2023-11-14T22:13:20.125Z",
            "segments": 2,
            "encoding": "UCS-2",
        },
    ]
    assert echoed == [
        f"[outbox] cart-recovery -> u1 (1 segment): {TEXT}",
        "[outbox] cart-recovery -> u2 (2 segments): Hé ✓ two\\nlines",
    ]
    assert not any(PHONE in e or PHONE[1:] in e for e in echoed)

    # Appending to an existing outbox continues the ids instead of repeating them.
    with OutboxGateway(path, echo=None) as again:
        assert again.send(make_msg(3)).message_id == "outbox-3"
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3


def test_outbox_is_thread_safe(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    gw = OutboxGateway(path, echo=lambda _line: None)
    ids: list[str | None] = []
    ids_lock = threading.Lock()

    def worker(t: int) -> None:
        for k in range(50):
            res = gw.send(make_msg(t * 1000 + k, text="x" * 300))
            with ids_lock:
                ids.append(res.message_id)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    gw.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 400
    assert len({r["decision_id"] for r in records}) == 400
    assert sorted(ids, key=lambda s: int(str(s).split("-")[1])) == [
        f"outbox-{n}" for n in range(1, 401)
    ]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"to": "447700900123"}, "invalid_number"),
        ({"to": "+44 7700 900123"}, "invalid_number"),
        ({"text": ""}, "invalid_message"),
        ({"encoding": "latin-1"}, "invalid_params"),
        ({"segments": 0}, "invalid_params"),
    ],
)
def test_outbox_rejects_bad_messages_without_writing(
    tmp_path: Path, overrides: dict[str, Any], reason: str
) -> None:
    path = tmp_path / "outbox.jsonl"
    with OutboxGateway(path, echo=None) as gw:
        with pytest.raises(PermanentGatewayError) as info:
            gw.send(make_msg(**overrides))
    assert info.value.reason == reason
    assert path.read_text() == ""


def test_outbox_after_close_is_retryable(tmp_path: Path) -> None:
    gw = OutboxGateway(tmp_path / "o.jsonl", echo=None)
    gw.close()
    with pytest.raises(RetryableGatewayError) as info:
        gw.send(make_msg())
    assert info.value.reason == "closed"


# --------------------------------------------------------------------------------------------
# Vonage through the SDK to the HTTPS fake


@pytest.fixture(scope="module")
def fake_server() -> Iterator[VonageFake]:
    with VonageFake() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: VonageFake, monkeypatch: pytest.MonkeyPatch) -> Iterator[VonageFake]:
    fake_server.reset()
    fake_server.latency_s = 0.0
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake_server.ca_path)
    yield fake_server
    fake_server.reset()


@pytest.fixture
def gw(fake: VonageFake) -> Iterator[VonageGateway]:
    gateway = VonageGateway(fake.api_key, fake.api_secret, "NudgeFlow", rest_host=fake.host)
    yield gateway
    gateway.close()


def secrets_of(fake: VonageFake) -> tuple[str, ...]:
    basic = b64encode(f"{fake.api_key}:{fake.api_secret}".encode()).decode()
    return (fake.api_secret, basic)


def test_vonage_sends_gsm_text_through_sdk(fake: VonageFake, gw: VonageGateway) -> None:
    assert isinstance(gw, Gateway)
    result = gw.send(make_msg(7))

    [req] = fake.requests
    assert req.path == "/sms/json"
    assert req.auth == "basic" and req.api_key == fake.api_key
    assert req.fields["to"] == PHONE[1:]  # Vonage wants E.164 without the plus
    assert req.fields["from"] == "NudgeFlow"
    assert req.fields["text"] == TEXT
    assert req.fields["client-ref"] == "dec-0007"
    assert req.fields.get("type", "text") == "text"
    assert fake.api_secret not in json.dumps(req.fields)  # secret travels in the header only
    assert result.message_id is not None and result.message_id.startswith("FAKE")
    assert result.price == "0.03330000"
    assert result.network == "12345"
    assert result.remaining_balance is not None


def test_vonage_unicode_multipart_sets_type_and_sums_price(
    fake: VonageFake, gw: VonageGateway
) -> None:
    text = "Привет! " * 20  # 160 UTF-16 units -> 3 parts of 67
    assert message_parts(text, unicode=True) == 3
    result = gw.send(make_msg(1, text=text, encoding="UCS-2", segments=3))

    [req] = fake.requests
    assert req.fields["type"] == "unicode"
    assert req.fields["text"] == text
    assert req.fields["client-ref"] == "dec-0001"
    assert result.price == "0.09990000"  # three parts of 0.0333
    assert result.message_id is not None


def test_vonage_throttled_status_is_retryable(fake: VonageFake, gw: VonageGateway) -> None:
    fake.script(["throttle", "ok"])
    with pytest.raises(RetryableGatewayError) as info:
        gw.send(make_msg())
    assert (info.value.reason, info.value.status) == ("throttled", "1")
    assert not leaks(info.value, *secrets_of(fake), PHONE[1:], TEXT)
    # The next attempt goes through; the fake saw both, with the same client-ref.
    assert gw.send(make_msg()).message_id is not None
    assert [r.fields["client-ref"] for r in fake.requests] == ["dec-0000", "dec-0000"]


def test_vonage_invalid_params_status_is_permanent(fake: VonageFake, gw: VonageGateway) -> None:
    fake.script([3])
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg())
    assert (info.value.reason, info.value.status) == ("invalid_params", "3")
    assert not leaks(info.value, *secrets_of(fake), PHONE[1:], TEXT)


@pytest.mark.parametrize("status", [str(n) for n in sorted(int(s) for s in VONAGE_STATUSES)])
def test_vonage_every_documented_status_maps_to_its_reason(
    fake: VonageFake, gw: VonageGateway, status: str
) -> None:
    reason, retryable, _ = VONAGE_STATUSES[status]
    fake.script([f"status:{status}"])
    with pytest.raises(GatewayError) as info:
        gw.send(make_msg())
    assert info.value.reason == reason
    assert info.value.status == status
    assert isinstance(info.value, RetryableGatewayError if retryable else PermanentGatewayError)
    assert not leaks(info.value, *secrets_of(fake), PHONE[1:], TEXT)


def test_vonage_unknown_status_is_permanent(fake: VonageFake, gw: VonageGateway) -> None:
    fake.script([99])
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg())
    assert (info.value.reason, info.value.status) == ("unknown_status", "99")


@pytest.mark.parametrize(
    ("behaviour", "reason", "http_status"),
    [
        ("http429", "throttled", 429),
        ("http500", "server_error", 500),
        ("http:503", "server_error", 503),
    ],
)
def test_vonage_http_throttle_and_5xx_are_retryable(
    fake: VonageFake, gw: VonageGateway, behaviour: str, reason: str, http_status: int
) -> None:
    fake.script([behaviour])
    with pytest.raises(RetryableGatewayError) as info:
        gw.send(make_msg())
    assert (info.value.reason, info.value.http_status) == (reason, http_status)
    assert len(fake.requests) == 1  # no hidden retry inside the SDK
    assert not leaks(info.value, *secrets_of(fake), PHONE[1:], TEXT)


def test_vonage_send_after_a_5xx_that_closed_the_connection_is_not_ambiguous(
    fake: VonageFake, gw: VonageGateway
) -> None:
    """The fake ends the connection after a 5xx and says so (``Connection: close``), as an
    HTTP/1.1 server must; the next send then opens a new connection and its text is delivered.
    Unannounced, the next request raced the close and failed as ``connection_lost`` in about one
    round in seven."""
    for i in range(20):
        fake.script(["http500", "ok"])
        with pytest.raises(RetryableGatewayError):
            gw.send(make_msg(2 * i))
        gw.send(make_msg(2 * i + 1))
    refs = [r.fields["client-ref"] for r in fake.requests]
    assert refs == [f"dec-{k:04d}" for k in range(40)]


def test_vonage_http_403_is_permanent(fake: VonageFake, gw: VonageGateway) -> None:
    fake.script(["http403"])
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg())
    assert (info.value.reason, info.value.http_status) == ("forbidden", 403)


def short_timeout_gateway(fake: VonageFake, host: str | None = None) -> VonageGateway:
    gw = VonageGateway(
        fake.api_key, fake.api_secret, "NudgeFlow", rest_host=host or fake.host, timeout_s=0.5
    )
    assert gw.timeout_s == 1  # the SDK only takes whole seconds
    return gw


@pytest.mark.parametrize(
    ("behaviour", "reason", "took"),
    [
        # The fake took the text, then the answer came after the client's 1 s timeout.
        ("delay:3", "timeout", True),
        # The text was taken, then the connection closed / was reset / the answer was cut.
        ("took:close", "connection_lost", True),
        ("took:reset", "connection_lost", True),
        ("took:truncate", "connection_lost", True),
        # Dropped after the request was read, nothing taken: the client cannot tell the difference.
        ("close", "connection_lost", False),
    ],
)
def test_vonage_failure_after_the_request_was_sent_is_ambiguous_and_not_resent(
    fake: VonageFake, behaviour: str, reason: str, took: bool
) -> None:
    gw = short_timeout_gateway(fake)
    fake.script([behaviour])
    start = time.monotonic()
    with pytest.raises(AmbiguousGatewayError) as info:
        gw.send(make_msg())
    elapsed = time.monotonic() - start
    time.sleep(0.2)  # a hidden re-POST by the SDK would show up now
    gw.close()
    assert info.value.reason == reason
    assert not info.value.retryable
    assert elapsed < 2.5
    [req] = fake.requests  # the request reached the gateway, exactly once
    assert (req.reply.kind in ("ok", "partial")) == took
    assert not leaks(info.value, *secrets_of(fake), PHONE[1:], TEXT)


def test_vonage_refused_connection_is_retryable(fake: VonageFake) -> None:
    gw = short_timeout_gateway(fake)
    with fake.refusing():
        with pytest.raises(RetryableGatewayError) as info:
            gw.send(make_msg())
    assert info.value.reason == "connection_error"
    assert gw.send(make_msg()).message_id is not None  # listening again: the retry goes through
    gw.close()
    assert [r.fields["client-ref"] for r in fake.requests] == ["dec-0000"]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        # TCP accepted, the TLS handshake never answered: requests raises ReadTimeout, as for a
        # late answer, yet nothing was sent.
        ("stall_handshake", "connect_timeout"),
        # Reset instead of the handshake: ConnectionError(ProtocolError(ConnectionResetError)),
        # the same shape as a connection lost after sending.
        ("reset_handshake", "connection_error"),
    ],
)
def test_vonage_failure_during_the_tls_handshake_is_retryable(
    fake: VonageFake, fault: str, reason: str
) -> None:
    gw = short_timeout_gateway(fake)
    fake.connection_fault = fault  # type: ignore[assignment]
    try:
        with pytest.raises(RetryableGatewayError) as info:
            gw.send(make_msg())
    finally:
        fake.connection_fault = None
    assert info.value.reason == reason
    assert fake.requests == []
    assert gw.send(make_msg()).message_id is not None
    gw.close()


def test_vonage_connect_timeout_is_retryable(fake: VonageFake) -> None:
    with Blackhole() as unreachable:
        gw = short_timeout_gateway(fake, host=unreachable.host)
        start = time.monotonic()
        with pytest.raises(RetryableGatewayError) as info:
            gw.send(make_msg())
        elapsed = time.monotonic() - start
        gw.close()
    assert info.value.reason == "connect_timeout"
    assert 0.9 <= elapsed < 2.5
    assert not leaks(info.value, *secrets_of(fake), PHONE[1:], TEXT)


def test_vonage_bad_credentials_are_permanent_and_secret_free(fake: VonageFake) -> None:
    wrong_secret = "wrong-secret-4711"
    gw = VonageGateway(fake.api_key, wrong_secret, "NudgeFlow", rest_host=fake.host)
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg())
    gw.close()
    assert (info.value.reason, info.value.status) == ("bad_credentials", "4")
    basic = b64encode(f"{fake.api_key}:{wrong_secret}".encode()).decode()
    assert not leaks(info.value, wrong_secret, basic, fake.api_secret, PHONE[1:], TEXT)
    assert wrong_secret not in repr(gw)


def test_vonage_partial_multipart_failure_is_permanent(fake: VonageFake, gw: VonageGateway) -> None:
    fake.script(["partial"])
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg())
    assert (info.value.reason, info.value.status) == ("partial_failure", "1")


def test_vonage_untrusted_certificate_is_a_retryable_tls_error(
    fake: VonageFake, gw: VonageGateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = VonageFake()  # a different CA: the client must refuse the fake's certificate
    ca_copy = tmp_path / "other-ca.pem"
    ca_copy.write_text(Path(other.ca_path).read_text())
    other.stop()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_copy))
    with pytest.raises(RetryableGatewayError) as info:
        gw.send(make_msg())
    assert info.value.reason == "tls_error"
    assert fake.requests == []


def test_vonage_rejects_bad_input_before_any_request(fake: VonageFake, gw: VonageGateway) -> None:
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg(to="07700900123"))
    assert info.value.reason == "invalid_number"
    with pytest.raises(PermanentGatewayError) as info:
        gw.send(make_msg(decision_id="d" * 101))  # longer than Vonage's client-ref
    assert info.value.reason == "invalid_params"
    assert fake.requests == []


def test_vonage_sdk_logs_carry_no_secret_number_or_text(
    fake: VonageFake, gw: VonageGateway, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script(["http500", "ok"])
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(RetryableGatewayError):
            gw.send(make_msg())
        gw.send(make_msg())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for needle in (*secrets_of(fake), PHONE[1:], TEXT):
        assert needle not in logged


def test_vonage_is_thread_safe_with_one_client_per_thread(
    fake: VonageFake, gw: VonageGateway
) -> None:
    fake.latency_s = 0.05
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for k in range(10):
                gw.send(make_msg(t * 100 + k))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - start
    assert errors == []
    refs = [r.fields["client-ref"] for r in fake.requests]
    assert sorted(refs) == sorted(f"dec-{t * 100 + k:04d}" for t in range(4) for k in range(10))
    assert elapsed < 0.6 * 40 * 0.05  # the four threads really overlapped (serial: 2 s)


def test_vonage_gateway_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        VonageGateway("", "secret", "NudgeFlow")
    with pytest.raises(ValueError):
        VonageGateway("key", "secret", "")
    with pytest.raises(ValueError):
        VonageGateway("key", "secret", "NudgeFlow", rest_host="https://x/y")
    with pytest.raises(ValueError):
        VonageGateway("key", "secret", "NudgeFlow", timeout_s=0)


def test_closed_vonage_gateway_is_retryable(fake: VonageFake) -> None:
    gw = VonageGateway(fake.api_key, fake.api_secret, "NudgeFlow", rest_host=fake.host)
    gw.send(make_msg())
    gw.close()
    with pytest.raises(RetryableGatewayError) as info:
        gw.send(make_msg())
    assert info.value.reason == "closed"
