"""SMS gateways behind one small interface (``Gateway``): a local outbox and Vonage."""

from processors.gateways.base import (
    AmbiguousGatewayError,
    Gateway,
    GatewayError,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    SmsMessage,
)

__all__ = [
    "AmbiguousGatewayError",
    "Gateway",
    "GatewayError",
    "PermanentGatewayError",
    "RetryableGatewayError",
    "SendResult",
    "SmsMessage",
]
