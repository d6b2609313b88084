"""The aiohttp application: routes, request rules and the service's lifecycle.

Routes (``docs/webhooks.openapi.yaml``): ``GET|POST /webhooks/vonage/delivery``
(:mod:`.delivery`), ``GET|POST /webhooks/vonage/inbound`` (:mod:`.inbound`), ``GET /l/{code}``
(:mod:`.clicks`), ``GET /healthz`` (200 once the contacts topic is read to its end) and
``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import redis
from aiohttp import web
from confluent_kafka import KafkaException
from prometheus_client import CONTENT_TYPE_LATEST

from processors import metrics
from processors.core.clock import wall_ms
from processors.core.policy import RetryPolicy
from processors.gateways.base import Gateway
from processors.kafka.async_producer import AsyncProducer
from processors.kafka.contacts import ContactsFollower, ContactsThread
from processors.redis import DEFAULT_PREFIX, RedisStore
from processors.redis.client import Client, connect
from processors.redis.rate_limit import RateLimiter
from processors.settings import Settings
from processors.webhooks.clicks import Clicks
from processors.webhooks.context import Context
from processors.webhooks.delivery import DeliveryReceipts
from processors.webhooks.errors import SignatureError, WebhookError
from processors.webhooks.inbound import InboundTexts, Replies
from processors.webhooks.params import parse_inbound, parse_receipt, read_params
from processors.webhooks.signatures import SignatureVerifier
from processors.webhooks.state import WebhookState
from schemas.codec import Codec

log = logging.getLogger("nudgeflow.webhooks")

DELIVERY_PATH: Final = "/webhooks/vonage/delivery"
INBOUND_PATH: Final = "/webhooks/vonage/inbound"


class WebhookService:
    """The aiohttp application and what it needs: Redis, a producer, the contacts follower and
    a gateway for confirmations (the dispatcher's gateway and shared rate limit)."""

    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        *,
        redis_client: Client | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        rate_per_s: float = 30.0,
        retry: RetryPolicy | None = None,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        """``clock``: epoch ms stamped on clicks and inbound texts (wall time; a replay of
        ``nudgeflow demo`` passes its event-time clock)."""
        self.settings = settings
        self.gateway = gateway
        self.redis = redis_client or connect(settings.redis_url)
        self.store = RedisStore(self.redis, key_prefix)
        state = WebhookState(self.redis, key_prefix, int(settings.webhook_dedup_ttl_s * 1000))
        codec = Codec(settings.schema_registry_url)
        self.ctx = Context(settings, self.store, state, codec, clock)
        self.max_body = settings.webhook_max_body_bytes
        secret = settings.webhook_signature_secret
        self.verifier = (
            SignatureVerifier(
                secret.get_secret_value(),
                settings.webhook_signature_method,
                settings.webhook_timestamp_tolerance_s,
            )
            if secret is not None and secret.get_secret_value()
            else None
        )
        self.follower = ContactsThread(
            ContactsFollower(settings, self.store, codec, "nudgeflow-webhooks-contacts"),
            "webhooks-contacts",
        )
        self.receipts = DeliveryReceipts(self.ctx)
        self.inbound_texts = InboundTexts(
            self.ctx,
            gateway,
            RateLimiter(self.redis, rate_per_s, key=f"{key_prefix}ratelimit:gateway"),
            retry or RetryPolicy(),
            Replies.from_settings(settings),
        )
        self.clicks = Clicks(self.ctx)

    @property
    def producer(self) -> AsyncProducer | None:
        return self.ctx.producer

    @producer.setter
    def producer(self, producer: AsyncProducer | None) -> None:
        self.ctx.producer = producer

    @property
    def replies_sent(self) -> int:
        """Keyword confirmations sent so far."""
        return self.inbound_texts.sent

    async def wait_replies(self) -> None:
        """Wait for the confirmations in flight (tests, shutdown)."""
        while self.inbound_texts.tasks:
            await asyncio.gather(*list(self.inbound_texts.tasks), return_exceptions=True)

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.max_body)
        for path, handler in ((DELIVERY_PATH, self.delivery), (INBOUND_PATH, self.inbound)):
            app.router.add_get(path, handler, allow_head=False)
            app.router.add_post(path, handler)
        app.router.add_get("/l/{code}", self.clicks.handle)
        app.router.add_get("/healthz", self.healthz, allow_head=False)
        app.router.add_get("/metrics", self.metrics, allow_head=False)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self.ctx.producer = AsyncProducer(self.settings)
        self.follower.start()

    async def _cleanup(self, _app: web.Application) -> None:
        if self.inbound_texts.tasks:
            await asyncio.gather(*self.inbound_texts.tasks, return_exceptions=True)
        self.follower.stop()
        producer = self.ctx.producer
        if producer is not None:
            await asyncio.get_running_loop().run_in_executor(self.ctx.pool, producer.close)
            self.ctx.producer = None  # the client goes now, not with the last reference to us
        self.ctx.pool.shutdown(wait=True)
        self.gateway.close()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except WebhookError as exc:
            if isinstance(exc, SignatureError):
                endpoint = "delivery" if request.path == DELIVERY_PATH else "inbound"
                metrics.WEBHOOK_SIGNATURE_FAILURES.labels(endpoint).inc()
            log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
            return web.json_response({"error": exc.reason, "detail": exc.detail}, status=exc.status)
        except web.HTTPException:
            raise
        except (TimeoutError, redis.RedisError, KafkaException, BufferError, OSError) as exc:
            log.warning("%s %s -> 503 (%s)", request.method, request.path, type(exc).__name__)
            return web.json_response(
                {"error": "unavailable", "detail": "try again later"},
                status=503,
                headers={"Retry-After": "5"},
            )

    async def _params(self, request: web.Request) -> dict[str, str]:
        params = await read_params(request, self.max_body)
        if self.verifier is not None:
            self.verifier.verify(params, time.time())
        return params

    # ------------------------------------------------------------------ routes

    async def delivery(self, request: web.Request) -> web.StreamResponse:
        await self.receipts.handle(parse_receipt(await self._params(request)))
        return _ok()

    async def inbound(self, request: web.Request) -> web.StreamResponse:
        await self.inbound_texts.handle(parse_inbound(await self._params(request)))
        return _ok()

    async def healthz(self, _request: web.Request) -> web.StreamResponse:
        if self.follower.error is not None:
            return web.json_response({"status": "error", "contacts": "failed"}, status=503)
        if not self.follower.ready.is_set():
            return web.json_response({"status": "starting", "contacts": "loading"}, status=503)
        return web.json_response({"status": "ok", "signed": self.verifier is not None})

    async def metrics(self, _request: web.Request) -> web.StreamResponse:
        body = metrics.exposition().encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _ok() -> web.Response:
    return web.json_response({"status": "ok"})
