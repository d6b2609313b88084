"""Send texts through the Vonage SMS API with the official ``vonage`` SDK (v4).

How the SDK behaves, and why this wrapper is shaped the way it is (vonage 4.9 /
vonage-http-client 1.5 / vonage-sms 1.2):

* ``Sms.send`` posts the form to ``https://{rest_host}/sms/json`` (scheme hard-coded) with HTTP
  basic auth. A non-zero ``status`` in a one-part answer raises ``SmsError`` whose only payload is
  the text ``"... failed with error code N: <error-text>"``; a multi-part answer with some non-zero
  status raises ``PartialFailureError`` carrying the response dict. HTTP 401/403/404/429/500 raise
  ``AuthenticationError`` / ``ForbiddenError`` / ``NotFoundError`` / ``RateLimitedError`` /
  ``ServerError`` (all ``HttpRequestError``; other codes raise ``HttpRequestError`` itself).
  Timeouts and network failures surface as ``requests`` exceptions (see "Did it leave?").
* On a ``RemoteDisconnected`` the SDK silently re-POSTs up to ``pool_maxsize`` times; if Vonage had
  accepted the first POST that is a duplicate text the caller never hears about. Each thread
  therefore gets its own client with ``pool_maxsize=1`` (so exactly one attempt) and
  ``max_retries=0``: one ``send`` is at most one HTTP request, and retrying is the dispatcher's
  decision, made with a typed error in hand.
* ``HttpClientOptions.timeout`` is an integer number of seconds; ``timeout_s`` is rounded up.
* Did it leave? The SMS API has no idempotency key, so a failure after the request was written
  may hide an accepted text: that is ``AmbiguousGatewayError`` (``timeout`` / ``connection_lost``)
  and must not be retried. The exception type alone cannot tell (measured against the HTTPS fake
  with requests 2.34 / urllib3 2.8): a TLS handshake that times out raises ``ReadTimeout`` like a
  late answer, and a reset during the handshake raises ``ConnectionError(ProtocolError(
  ConnectionResetError))`` like a connection lost while waiting. What tells is where urllib3
  failed: connecting and the handshake happen in ``HTTPConnectionPool._validate_conn``, before
  ``conn.request`` writes a byte, and that frame stays in the traceback of the socket error at
  the bottom of the chain. So: ``ConnectTimeout`` or a ``_validate_conn`` frame anywhere in the
  chain -> the request never left -> ``RetryableGatewayError`` (``connect_timeout``,
  ``connection_error`` for refused / reset / DNS, ``tls_error``); any other transport failure
  (read timeout, ``RemoteDisconnected``, ``ChunkedEncodingError`` on a cut answer, an SSL error
  while reading) -> ambiguous. That holds because one ``send`` is one attempt (below); a
  pooled connection that the server closed while idle is normally detected by urllib3 before
  it is reused, and the rare race with that close counts as ambiguous (a lost text, never two).
* The ``vonage`` logger writes request params and headers (basic-auth secret, number, text) at
  DEBUG and response bodies at WARNING, so this module drops every record of that logger.
* TLS trust: the SDK offers no CA option and calls ``Session.request`` without ``verify``, so
  requests' environment merge applies: ``REQUESTS_CA_BUNDLE`` (else ``CURL_CA_BUNDLE``) is read at
  *request* time and overrides ``Session.verify``. To talk to the local test fake, point
  ``REQUESTS_CA_BUNDLE`` at ``fake.ca_path`` (in-process or in a child's environment); the system
  bundle is then not trusted by that process's ``requests``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Any

import requests
from pydantic import SecretStr, ValidationError
from vonage import Auth, HttpClientOptions, Vonage
from vonage_http_client.errors import (
    AuthenticationError,
    ForbiddenError,
    HttpRequestError,
    NotFoundError,
    RateLimitedError,
)
from vonage_sms import PartialFailureError, SmsError
from vonage_sms import SmsMessage as VonageSmsMessage

from processors.gateways.base import (
    VONAGE_STATUSES,
    AmbiguousGatewayError,
    GatewayError,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    SmsMessage,
    validate_message,
    vonage_status_error,
)

log = logging.getLogger(__name__)

_SDK_LOGGER = "vonage"
_STATUS_IN_TEXT = re.compile(r"error code (\d+)")


def _drop_all(record: logging.LogRecord) -> bool:
    return False


def _silence_sdk_logger() -> None:
    """The SDK logs auth headers, numbers and texts; none of it may reach our logs."""
    sdk_logger = logging.getLogger(_SDK_LOGGER)
    if _drop_all not in sdk_logger.filters:
        sdk_logger.addFilter(_drop_all)


def _reveal(value: str | SecretStr) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class VonageGateway:
    """``Gateway`` over the Vonage SMS API. Thread-safe (one SDK client per calling thread)."""

    name = "vonage"

    def __init__(
        self,
        api_key: str | SecretStr,
        api_secret: str | SecretStr,
        sender: str,
        rest_host: str = "rest.nexmo.com",
        timeout_s: float = 10.0,
    ) -> None:
        key, secret = _reveal(api_key), _reveal(api_secret)
        if not key or not secret:
            raise ValueError("VonageGateway needs a non-empty api_key and api_secret")
        if not sender:
            raise ValueError("VonageGateway needs a non-empty sender")
        if not rest_host or "/" in rest_host:
            raise ValueError("rest_host must be a host[:port] without scheme or path")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.sender = sender
        self.rest_host = rest_host
        self.timeout_s = max(1, math.ceil(timeout_s))
        self._auth = Auth(api_key=key, api_secret=secret)
        self._options = HttpClientOptions(
            rest_host=rest_host,
            timeout=self.timeout_s,
            pool_connections=1,
            pool_maxsize=1,
            max_retries=0,
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Vonage] = []
        self._closed = False
        _silence_sdk_logger()

    def __repr__(self) -> str:
        return f"VonageGateway(rest_host={self.rest_host!r}, sender={self.sender!r})"

    def _client(self) -> Vonage:
        client: Vonage | None = getattr(self._local, "client", None)
        if client is None:
            client = Vonage(self._auth, self._options)
            with self._lock:
                if self._closed:
                    raise RetryableGatewayError("closed", "Vonage gateway is closed")
                self._clients.append(client)
            self._local.client = client
        return client

    def send(self, msg: SmsMessage) -> SendResult:
        validate_message(msg)
        if self._closed:
            raise RetryableGatewayError("closed", "Vonage gateway is closed")
        try:
            request = VonageSmsMessage(
                to=msg.to.removeprefix("+"),
                from_=self.sender,
                text=msg.text,
                client_ref=msg.decision_id,
                type="unicode" if msg.encoding == "UCS-2" else "text",
            )
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            raise PermanentGatewayError(
                "invalid_params", f"SDK rejected the message fields: {', '.join(fields)}"
            ) from None
        client = self._client()
        try:
            response = client.sms.send(request)
        except Exception as exc:  # noqa: BLE001 - every SDK/transport error is translated
            raise _translate(exc, client) from None
        messages = [m.model_dump() for m in response.messages]
        log.debug("vonage accepted decision %s in %d part(s)", msg.decision_id, len(messages))
        return _result(messages)

    def close(self) -> None:
        """Close every thread's HTTP session (the SDK has no public close, hence ``_session``)."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            session = getattr(client.http_client, "_session", None)
            if session is not None:
                session.close()

    def __enter__(self) -> VonageGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result(messages: list[dict[str, Any]]) -> SendResult:
    """One ``SendResult`` for all parts: first id and network, summed price, last balance."""
    if not messages:
        return SendResult(None, None, None, None)
    price: str | None = None
    try:
        prices = [m.get("message_price") for m in messages]
        if all(p is not None for p in prices):
            price = str(sum((Decimal(p) for p in prices if p is not None), Decimal(0)))
    except InvalidOperation:
        price = None
    return SendResult(
        message_id=messages[0].get("message_id"),
        price=price,
        network=messages[0].get("network"),
        remaining_balance=messages[-1].get("remaining_balance"),
    )


def _from_statuses(statuses: list[str]) -> GatewayError:
    """Classify a multi-part answer in which at least one part failed."""
    failed = [s for s in statuses if s != "0"]
    if len(failed) < len(statuses):
        # Some parts are on their way: a retry would send them again.
        return PermanentGatewayError(
            "partial_failure",
            f"Vonage accepted {len(statuses) - len(failed)} of {len(statuses)} parts; "
            f"first failure status {failed[0]}",
            status=failed[0],
        )
    for status in failed:
        if not VONAGE_STATUSES.get(status, ("", False, ""))[1]:
            return vonage_status_error(status)
    return vonage_status_error(failed[0])


def _statuses_of_last_response(client: Vonage) -> list[str] | None:
    try:
        body = client.http_client.last_response.json()
        return [str(m["status"]) for m in body["messages"]]
    except Exception:  # noqa: BLE001 - best effort on a malformed answer
        return None


def _translate(exc: Exception, client: Vonage) -> GatewayError:
    """Map an SDK or ``requests`` exception to a typed error without echoing its text."""
    kind = type(exc).__name__
    if isinstance(exc, PartialFailureError):
        response = exc.response if isinstance(exc.response, dict) else {}
        statuses = [str(m.get("status")) for m in response.get("messages", [])]
        return _from_statuses(statuses) if statuses else PermanentGatewayError("bad_response")
    if isinstance(exc, SmsError):
        match = _STATUS_IN_TEXT.search(str(exc))
        if match:
            return vonage_status_error(match.group(1))
        return PermanentGatewayError("bad_response", "Vonage SMS error without a status code")
    if isinstance(exc, HttpRequestError):
        code = exc.response.status_code
        if isinstance(exc, RateLimitedError):
            return RetryableGatewayError("throttled", "Vonage HTTP 429", http_status=code)
        if code >= 500:
            return RetryableGatewayError("server_error", f"Vonage HTTP {code}", http_status=code)
        if isinstance(exc, AuthenticationError):
            return PermanentGatewayError("bad_credentials", "Vonage HTTP 401", http_status=code)
        if isinstance(exc, ForbiddenError):
            return PermanentGatewayError("forbidden", "Vonage HTTP 403", http_status=code)
        if isinstance(exc, NotFoundError):
            return PermanentGatewayError("not_found", "Vonage HTTP 404", http_status=code)
        return PermanentGatewayError("http_error", f"Vonage HTTP {code}", http_status=code)
    if isinstance(exc, requests.exceptions.RequestException):
        return _transport_error(exc)
    if isinstance(exc, KeyError | TypeError | ValueError):
        # The SDK choked on the answer (e.g. an error without error-text, a non-JSON body).
        seen = _statuses_of_last_response(client)
        if seen and any(s != "0" for s in seen):
            return _from_statuses(seen)
        return PermanentGatewayError("bad_response", f"unreadable Vonage answer ({kind})")
    return PermanentGatewayError("unexpected_error", f"unexpected SDK failure ({kind})")


_NOT_SENDABLE = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidHeader,
)


def _transport_error(exc: requests.exceptions.RequestException) -> GatewayError:
    """Retryable when the request provably never left, else ambiguous (module docstring)."""
    kind = type(exc).__name__
    if isinstance(exc, _NOT_SENDABLE):
        return PermanentGatewayError("bad_request", f"request to Vonage not sendable ({kind})")
    if _never_left(exc):
        if isinstance(exc, requests.exceptions.Timeout):
            return RetryableGatewayError(
                "connect_timeout", f"connecting to Vonage timed out ({kind})"
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return RetryableGatewayError("tls_error", "TLS handshake with Vonage failed")
        return RetryableGatewayError("connection_error", f"Vonage connection failed ({kind})")
    if isinstance(exc, requests.exceptions.Timeout):
        return AmbiguousGatewayError(
            "timeout", f"no answer from Vonage in time; the text may have been sent ({kind})"
        )
    return AmbiguousGatewayError(
        "connection_lost",
        f"connection to Vonage lost after the request was sent; the text may have been sent "
        f"({kind})",
    )


def _never_left(exc: BaseException) -> bool:
    """Whether the failure happened while connecting (TCP or TLS), before the request was
    written: a ``ConnectTimeout``, or urllib3's ``_validate_conn`` on some traceback in the
    exception chain (``__cause__`` / ``__context__``)."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, requests.exceptions.ConnectTimeout):
            return True
        tb = current.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if (
                frame.f_code.co_name == "_validate_conn"
                and frame.f_globals.get("__name__") == "urllib3.connectionpool"
            ):
                return True
            tb = tb.tb_next
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return False
