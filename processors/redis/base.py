"""What every part of the Redis store shares: the client, the key layout and its scripts.

Keys (``P`` = prefix, ``{u}`` = user id as a hash tag, so one user's keys share a cluster slot)
are listed in :mod:`processors.redis`; every key name is built here or from these helpers.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from processors.redis import scripts
from processors.redis.client import Client, is_cluster

DEFAULT_PREFIX = "nudgeflow:"
STATE_TTL_MS = 30 * 86_400_000
LEASE_MS = 60_000
EMIT_GRACE_MS = 5_000
"""How long a recorded outcome may wait for its publication before another instance that gets
the same decision re-publishes it (the owner is then presumed dead)."""
DEFERRED_SHARDS = 8
"""Shards of the deferred index on a Redis Cluster (one on a single Redis). Fixed for a
deployment: entries of a shard that a smaller count no longer names are never claimed."""


def text(value: Any) -> str | None:
    """A Redis reply as str (None for nil or false)."""
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


Call = tuple[list[str], list[Any]]
"""One script call: its keys (all in one cluster slot) and its arguments."""


class RedisBase:
    """The client, the key prefix, the time limits and the registered scripts.

    On a Redis Cluster (:func:`processors.redis.client.is_cluster`) ``cluster`` is True: batch
    operations run one script call per slot and the deferred index is split into
    ``deferred_shards`` shards ``P{deferred:<k>}``; on a single Redis it is one index under the
    names it always had (``Pdeferred``, ``Pdeferred:data``, ``Pdeferred:lease``)."""

    def __init__(
        self,
        client: Client,
        prefix: str = DEFAULT_PREFIX,
        *,
        state_ttl_ms: int = STATE_TTL_MS,
        lease_ms: int = LEASE_MS,
        call_lease_ms: int = 15_000,
        emit_grace_ms: int = EMIT_GRACE_MS,
        deferred_shards: int = DEFERRED_SHARDS,
    ) -> None:
        self.r = client
        self.cluster = is_cluster(client)
        self.prefix = prefix
        self.state_ttl_ms = state_ttl_ms
        self.lease_ms = lease_ms
        self.call_lease_ms = call_lease_ms
        self.emit_grace_ms = emit_grace_ms
        self.phone_prefix = f"{prefix}phone:"
        if self.cluster:
            if deferred_shards < 1:
                raise ValueError(f"deferred_shards must be >= 1, got {deferred_shards}")
            tags = [f"{prefix}{{deferred:{k}}}" for k in range(deferred_shards)]
        else:
            tags = [f"{prefix}deferred"]
        self.deferred_shards: list[tuple[str, str, str]] = [
            (tag, f"{tag}:data", f"{tag}:lease") for tag in tags
        ]
        self._scripts: dict[str, Any] = {}

    @property
    def deferred_keys(self) -> tuple[str, str, str]:
        """The single Redis' deferred index (``Pdeferred``, its data and its leases)."""
        if self.cluster:
            raise TypeError("a cluster's deferred index is sharded: use deferred_keys_of(id)")
        return self.deferred_shards[0]

    def deferred_keys_of(self, decision_id: str) -> tuple[str, str, str]:
        """The deferred index shard that holds ``decision_id`` (deferred, data, lease)."""
        shards = self.deferred_shards
        if len(shards) == 1:
            return shards[0]
        return shards[zlib.crc32(decision_id.encode()) % len(shards)]

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

    def slot_groups(self, first_keys: Sequence[str]) -> list[list[int]]:
        """Indexes of ``first_keys`` grouped by cluster slot, each group in the given order
        (groups in the order of their first member); a single Redis: one group of all."""
        if not isinstance(self.r, RedisCluster):
            return [list(range(len(first_keys)))]
        keyslot = self.r.keyslot
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(first_keys):
            groups.setdefault(keyslot(key), []).append(i)
        return list(groups.values())

    def run_calls(self, name: str, calls: Sequence[Call]) -> list[Any]:
        """Script ``name`` once per call (each call's keys in one slot), pipelined (one round
        trip per node); the replies in the order of ``calls``. The first error is raised after
        every reply is read (the other calls ran)."""
        script = self._script(name)
        if len(calls) == 1:
            keys, args = calls[0]
            return [script(keys=keys, args=args)]
        pipe = self.r.pipeline(transaction=False)
        for keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        replies = list(pipe.execute(raise_on_error=False))
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # a node without the script (e.g. promoted)
                keys, args = calls[i]
                replies[i] = script(keys=keys, args=args)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
