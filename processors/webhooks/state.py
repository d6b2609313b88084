"""The webhook service's own Redis keys (prefix ``P``): ``Pwh:claim:*`` idempotency claims,
``Pwh:reply:*`` sent confirmations, ``Pwh:dlr:*`` per-part receipts and published ranks. The
scripts are ``processors/redis/scripts/{webhook_claim,receipt_part,receipt_rank_*}.lua``."""

from __future__ import annotations

import json
from typing import Any, Final

from processors.redis import scripts
from processors.redis.client import Client

CLAIM_LEASE_MS: Final = 30_000
"""How long a webhook being processed blocks a concurrent duplicate (a crash frees it then)."""


class WebhookState:
    """Claims, sent confirmations and receipt parts, in Redis."""

    def __init__(self, client: Client, prefix: str, ttl_ms: int) -> None:
        self.r = client
        self.base = f"{prefix}wh:"
        self.ttl_ms = ttl_ms
        self._claim = scripts.register(client, "webhook_claim")
        self._record = scripts.register(client, "receipt_part")
        self._raise = scripts.register(client, "receipt_rank_raise")
        self._lower = scripts.register(client, "receipt_rank_lower")

    def claim(self, key: str) -> str:
        """``claimed`` (go ahead), ``done`` (already handled) or ``busy`` (in progress)."""
        result = self._claim(keys=[f"{self.base}claim:{key}"], args=[CLAIM_LEASE_MS])
        return result.decode() if isinstance(result, bytes) else str(result)

    def done(self, key: str) -> None:
        self.r.set(f"{self.base}claim:{key}", "done", px=self.ttl_ms)

    def release(self, key: str) -> None:
        self.r.delete(f"{self.base}claim:{key}")

    def claim_reply(self, message_id: str) -> bool:
        """At most one reply per inbound message, ever (a crash after this sends none)."""
        key = f"{self.base}reply:{message_id}"
        return bool(self.r.set(key, "1", nx=True, px=self.ttl_ms))

    def record_part(self, group: str, message_id: str, part: str) -> dict[str, dict[str, Any]]:
        """Record one part's receipt (JSON ``part``; a final status is kept); all parts."""
        raw = self._record(keys=[f"{self.base}dlr:{group}"], args=[message_id, part, self.ttl_ms])
        parts: dict[str, dict[str, Any]] = {}
        for i in range(0, len(raw), 2):
            key = raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])
            try:
                parts[key] = json.loads(raw[i + 1])
            except ValueError:
                continue
        return parts

    def raise_rank(self, group: str, rank: int) -> int:
        return int(self._raise(keys=[f"{self.base}dlr:{group}:pub"], args=[rank, self.ttl_ms]))

    def lower_rank(self, group: str, rank: int, previous: int) -> None:
        self._lower(keys=[f"{self.base}dlr:{group}:pub"], args=[rank, previous, self.ttl_ms])
