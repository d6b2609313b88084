"""The one small interface every SMS gateway implements, and its typed errors.

The dispatcher only needs to know two things about a failed send: *why* (a machine-friendly
``reason`` it can count and dead-letter with) and *whether trying again later can help*
(``RetryableGatewayError`` vs ``PermanentGatewayError``). Gateways translate their transport's
errors into exactly that, and never put a phone number, message text or secret into a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, Protocol, runtime_checkable

Encoding = Literal["GSM-7", "UCS-2"]
ENCODINGS: Final = ("GSM-7", "UCS-2")

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


@dataclass(frozen=True)
class SmsMessage:
    """One text to one recipient, as decided and rendered upstream.

    ``to`` is E.164 with a leading ``+``; ``segments`` and ``encoding`` come from the renderer
    and are recorded (outbox) or used to pick the API's message type (Vonage).
    """

    decision_id: str
    campaign_id: str
    user_id: str
    to: str
    text: str
    sent_at_ms: int
    segments: int
    encoding: str  # "GSM-7" | "UCS-2"


@dataclass(frozen=True)
class SendResult:
    """What the gateway learnt about an accepted message (all optional: the outbox knows little)."""

    message_id: str | None
    price: str | None
    network: str | None
    remaining_balance: str | None


class GatewayError(Exception):
    """A send that did not go through.

    ``reason`` is a short machine-friendly token (metric label / DLQ header); ``status`` is the
    Vonage status code as a string when the API gave one; ``http_status`` the HTTP status when
    the failure was an HTTP error. The message never contains secrets, numbers or text.
    """

    def __init__(
        self,
        reason: str,
        message: str | None = None,
        *,
        status: str | None = None,
        http_status: int | None = None,
    ) -> None:
        self.reason = reason
        self.status = status
        self.http_status = http_status
        super().__init__(message or reason)

    @property
    def retryable(self) -> bool:
        return isinstance(self, RetryableGatewayError)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={self.reason!r}, status={self.status!r}, "
            f"http_status={self.http_status!r}, message={str(self)!r})"
        )


class RetryableGatewayError(GatewayError):
    """Trying the same message again later may succeed (throttling, 5xx, timeouts, network)."""


class PermanentGatewayError(GatewayError):
    """Trying the same message again will fail the same way: dead-letter it."""


class AmbiguousGatewayError(GatewayError):
    """The request may have reached the gateway and been accepted (e.g. a read timeout after
    the request was written, or the connection dropped while waiting for the answer).

    Sending it again could deliver the text twice, so the dispatcher never retries it: the
    decision ends as ``failed: unknown_after_<reason>`` (at most one text per decision).
    """


# Vonage SMS API status code -> (reason, retryable, description). Descriptions are Vonage's
# generic texts, safe to log; the API's own ``error-text`` is not used (it may echo input).
VONAGE_STATUSES: Final[dict[str, tuple[str, bool, str]]] = {
    "1": ("throttled", True, "Throttled"),
    "2": ("missing_params", False, "Missing parameters"),
    "3": ("invalid_params", False, "Invalid parameters"),
    "4": ("bad_credentials", False, "Invalid credentials"),
    "5": ("internal_error", True, "Internal error"),
    "6": ("invalid_message", False, "Invalid message"),
    "7": ("barred", False, "Number barred"),
    "8": ("account_barred", False, "Partner account barred"),
    "9": ("quota_exceeded", False, "Partner quota violation"),
    "12": ("too_long", False, "Message too long"),
    "14": ("bad_signature", False, "Invalid signature"),
    "15": ("invalid_sender", False, "Invalid sender address"),
    "22": ("invalid_network", False, "Invalid network code"),
    "23": ("invalid_callback", False, "Invalid callback URL"),
    "29": ("non_whitelisted", False, "Non-whitelisted destination"),
    "33": ("invalid_number", False, "Number de-activated"),
}


def vonage_status_error(status: str) -> GatewayError:
    """The typed error for a non-zero Vonage status code (unknown codes are permanent)."""
    reason, retryable, text = VONAGE_STATUSES.get(
        status, ("unknown_status", False, "Unknown status")
    )
    cls = RetryableGatewayError if retryable else PermanentGatewayError
    return cls(reason, f"Vonage status {status}: {text}", status=status)


def validate_message(msg: SmsMessage) -> None:
    """Reject a message no gateway could send, before any side effect, with a typed error."""
    if not isinstance(msg.to, str) or not _E164.match(msg.to):
        raise PermanentGatewayError("invalid_number", "recipient is not an E.164 number")
    if not isinstance(msg.text, str) or not msg.text:
        raise PermanentGatewayError("invalid_message", "message text is empty")
    if msg.encoding not in ENCODINGS:
        raise PermanentGatewayError(
            "invalid_params", f"encoding must be one of {ENCODINGS}, got {msg.encoding!r}"
        )
    if not msg.decision_id:
        raise PermanentGatewayError("invalid_params", "decision_id is empty")
    if not isinstance(msg.segments, int) or msg.segments < 1:
        raise PermanentGatewayError("invalid_params", "segments must be a positive integer")


@runtime_checkable
class Gateway(Protocol):
    """Sends one text; raises ``RetryableGatewayError`` / ``PermanentGatewayError`` on failure.

    Implementations must be safe to call from several threads at once.
    """

    name: str

    def send(self, msg: SmsMessage) -> SendResult: ...

    def close(self) -> None: ...
