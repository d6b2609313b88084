"""The refusal of a webhook request: an HTTP status and a log-safe reason."""

from __future__ import annotations


class WebhookError(Exception):
    """A request we refuse: ``status`` is the HTTP answer, ``reason`` a log-safe token."""

    def __init__(self, status: int, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason


class SignatureError(WebhookError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(401, reason, detail)
