"""A gateway that writes texts to a local JSON Lines file instead of sending them.

The demo and the dev profile use it so the whole pipeline runs without a Vonage account; the file
is the demo's own record of what *would* have been sent, so it holds the number and the text.
The console echo shows the text (that is the point of a demo) but never the phone number.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from processors.core.events import iso_ms
from processors.gateways.base import (
    RetryableGatewayError,
    SendResult,
    SmsMessage,
    validate_message,
)

log = logging.getLogger(__name__)


class OutboxGateway:
    """Appends one JSON object per text to ``path`` and echoes a one-line summary.

    Thread-safe: one lock serialises the write, the flush and the echo, so lines never interleave
    and the file order equals the echo order. Message ids continue after the lines already in the
    file, so ids stay unique when a demo appends to an existing outbox.
    """

    name = "outbox"

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print) -> None:
        self.path = Path(path)
        self._echo = echo
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._count = self._existing_lines()
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def _existing_lines(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as f:
            return sum(1 for _ in f)

    def send(self, msg: SmsMessage) -> SendResult:
        validate_message(msg)
        record = {
            "decision_id": msg.decision_id,
            "campaign_id": msg.campaign_id,
            "user_id": msg.user_id,
            "to": msg.to,
            "text": msg.text,
            "sent_at": iso_ms(msg.sent_at_ms),
            "segments": msg.segments,
            "encoding": msg.encoding,
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                raise RetryableGatewayError("closed", "outbox gateway is closed")
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                raise RetryableGatewayError(
                    "io_error", f"outbox write failed: {type(exc).__name__}"
                ) from None
            self._count += 1
            message_id = f"outbox-{self._count}"
            if self._echo is not None:
                self._safe_echo(msg)
        return SendResult(message_id=message_id, price=None, network=None, remaining_balance=None)

    def _safe_echo(self, msg: SmsMessage) -> None:
        """The line is already on disk; a broken console must not turn it into a failed send."""
        unit = "segment" if msg.segments == 1 else "segments"
        text = msg.text.replace("\r", "\\r").replace("\n", "\\n")
        try:
            assert self._echo is not None
            self._echo(
                f"[outbox] {msg.campaign_id} -> {msg.user_id} ({msg.segments} {unit}): {text}"
            )
        except Exception as exc:  # noqa: BLE001 - cosmetic output only
            log.warning("outbox echo failed: %s", type(exc).__name__)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> OutboxGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
