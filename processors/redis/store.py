"""``RedisStore``: the one object the dispatcher, the webhooks and the tools share."""

from __future__ import annotations

from typing import Any

from processors.redis.base import DEFAULT_PREFIX
from processors.redis.batches import Batches
from processors.redis.client import connect
from processors.redis.sent import SentTexts


class RedisStore(Batches, SentTexts):
    """``PolicyStore`` over one Redis (decision records, batches, contacts), plus the sent texts
    and short links the webhooks read; thread-safe (redis-py pools connections). Over a single
    Redis or a Redis Cluster (:mod:`processors.redis.client`)."""

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, **kw: Any) -> RedisStore:
        """``url``: ``redis://...`` or ``redis+cluster://...`` (see ``client.connect``)."""
        return cls(connect(url), prefix, **kw)
