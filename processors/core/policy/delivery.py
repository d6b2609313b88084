"""The gateway call: retries with backoff, and the send time of a live text."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from processors.core.policy.requests import SendPlan
from processors.core.sms import (
    GatewayError,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    SmsMessage,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter for retryable gateway errors."""

    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 8.0

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Sleep before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        ceiling = min(self.max_s, self.base_s * (2**attempt))
        return (rng or random).uniform(ceiling / 2, ceiling)


def deliver(
    plan: SendPlan,
    send: Callable[[SmsMessage], SendResult],
    retry: RetryPolicy,
    *,
    acquire: Callable[[], object] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    rng: random.Random | None = None,
) -> SendResult | GatewayError:
    """Call ``send(message)`` with rate limiting and retries; never raises.

    ``acquire()`` blocks until the shared rate limit allows one more request; ``sleep(s)`` waits
    between attempts. Retryable errors are retried up to ``retry.attempts`` calls in total;
    anything that is not a ``GatewayError`` becomes a permanent ``unexpected_error`` (we cannot
    know whether the text went out, so it is never retried).
    """
    last: GatewayError = RetryableGatewayError("not_attempted")
    for attempt in range(max(1, retry.attempts)):
        if acquire is not None:
            acquire()
        try:
            return send(plan.message)
        except RetryableGatewayError as exc:
            last = exc
        except PermanentGatewayError as exc:
            return exc
        except GatewayError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - translate, never crash the worker thread
            return PermanentGatewayError("unexpected_error", type(exc).__name__)
        if attempt + 1 < retry.attempts:
            sleep(retry.delay_s(attempt, rng))
    return last


def with_send_time(plan: SendPlan, sent_at_ms: int) -> SendPlan:
    """The plan with the message stamped at the actual send time (live clock)."""
    return replace(plan, message=replace(plan.message, sent_at_ms=sent_at_ms))
