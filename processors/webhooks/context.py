"""What every callback handler shares: settings, Redis, the codec, the producer, the clock,
a thread pool for blocking calls, and exactly-once handling of a retried webhook."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from processors.kafka.async_producer import AsyncProducer
from processors.redis import RedisStore
from processors.settings import Settings
from processors.webhooks.errors import WebhookError
from processors.webhooks.state import WebhookState
from schemas.codec import Codec

PUBLISH_TIMEOUT_S: Final = 10.0


class Context:
    """Shared by the handlers of one service; ``producer`` is set while the app runs."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        state: WebhookState,
        codec: Codec,
        clock: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.codec = codec
        self.clock = clock
        self.producer: AsyncProducer | None = None
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhooks")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the pool (Redis and other blocking calls)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def publish(
        self,
        topic: str,
        key: str | None,
        name: str,
        record: Mapping[str, Any],
        timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        """Encode ``record`` as ``name`` and wait until the broker has it."""
        assert self.producer is not None
        value = self.codec.encode(name, record)
        future = self.producer.produce(topic, key.encode() if key else None, value)
        await asyncio.wait_for(future, timeout_s)

    async def once(self, key: str, what: str, apply: Callable[[], Awaitable[None]]) -> None:
        """``apply()`` unless the webhook ``key`` was handled already: the claim is marked done
        only after its effects, and released on a failure (the sender's retry does it again)."""
        claim = await self.run(self.state.claim, key)
        if claim == "done":
            return
        if claim == "busy":
            raise WebhookError(409, "in_progress", f"this {what} is being processed; retry later")
        try:
            await apply()
        except BaseException:
            await self.run(self.state.release, key)
            raise
        await self.run(self.state.done, key)
