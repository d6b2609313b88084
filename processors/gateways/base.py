"""The one small interface every SMS gateway implements (``Gateway``), message checks and
Vonage's status codes. The message, result and error types live in :mod:`processors.core.sms`
(the policy uses them) and are re-exported here for gateway code."""

from __future__ import annotations

import re
from typing import Final, Protocol, runtime_checkable

from processors.core.sms import (
    ENCODINGS,
    AmbiguousGatewayError,
    Encoding,
    GatewayError,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    SmsMessage,
)

__all__ = [
    "ENCODINGS",
    "AmbiguousGatewayError",
    "Encoding",
    "Gateway",
    "GatewayError",
    "PermanentGatewayError",
    "RetryableGatewayError",
    "SendResult",
    "SmsMessage",
    "VONAGE_STATUSES",
    "validate_message",
    "vonage_status_error",
]

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


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
