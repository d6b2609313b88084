"""What every part of the Redis store shares: the client, the key layout and its scripts.

Keys (``P`` = prefix, ``{u}`` = user id as a hash tag, so one user's keys share a cluster slot)
are listed in :mod:`processors.redis`; every key name is built here or from these helpers.
"""

from __future__ import annotations

from typing import Any

import redis

from processors.redis import scripts

DEFAULT_PREFIX = "nudgeflow:"
STATE_TTL_MS = 30 * 86_400_000
LEASE_MS = 60_000
EMIT_GRACE_MS = 5_000
"""How long a recorded outcome may wait for its publication before another instance that gets
the same decision re-publishes it (the owner is then presumed dead)."""


def text(value: Any) -> str | None:
    """A Redis reply as str (None for nil or false)."""
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBase:
    """The client, the key prefix, the time limits and the registered scripts."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        *,
        state_ttl_ms: int = STATE_TTL_MS,
        lease_ms: int = LEASE_MS,
        call_lease_ms: int = 15_000,
        emit_grace_ms: int = EMIT_GRACE_MS,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.state_ttl_ms = state_ttl_ms
        self.lease_ms = lease_ms
        self.call_lease_ms = call_lease_ms
        self.emit_grace_ms = emit_grace_ms
        self.phone_prefix = f"{prefix}phone:"
        base = f"{prefix}deferred"
        self.deferred_keys = (base, f"{base}:data", f"{base}:lease")
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str) -> Any:
        """Script ``name`` of :mod:`processors.redis.scripts`, registered once."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = scripts.register(self.r, name)
        return script

    def user_key(self, user_id: str) -> str:
        """``P{u}``: the prefix of every key of one user."""
        return f"{self.prefix}{{{user_id}}}"

    def decision_key(self, user_id: str, decision_id: str) -> str:
        return f"{self.user_key(user_id)}:d:{decision_id}"
