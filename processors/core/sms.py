"""An SMS as the policy approves it, what a gateway answers, and the typed errors of a send.

The policy needs two things about a failed send: *why* (a short ``reason`` it counts and
dead-letters with) and *whether trying again later can help* (``RetryableGatewayError`` vs
``PermanentGatewayError``; ``AmbiguousGatewayError`` when the text may have gone out). Gateways
(:mod:`processors.gateways`) translate their transport's errors into exactly these, and never
put a phone number, message text or secret into a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Encoding = Literal["GSM-7", "UCS-2"]
ENCODINGS: Final = ("GSM-7", "UCS-2")


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
