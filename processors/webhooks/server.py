"""The service on its own event loop in a thread (tests, the demo)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from processors.webhooks.app import WebhookService


class BackgroundServer:
    """The service on its own event loop in a thread (tests, the demo): ``url`` once started."""

    def __init__(self, service: WebhookService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhooks", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        follower = self.service.follower
        deadline = time.monotonic() + ready_timeout_s
        while not follower.ready.wait(0.05):
            if follower.error is not None or time.monotonic() > deadline:
                self.stop()
                why = type(follower.error).__name__ if follower.error else "timeout"
                raise RuntimeError(f"webhooks: contacts topic not read to its end ({why})")
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.service.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    def call(self, coro: Awaitable[Any], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (e.g. ``service.wait_replies()``)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
