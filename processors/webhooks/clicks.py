"""Tracked short links (created by the dispatcher, :mod:`processors.core.links`): a 302 to the
target and a ``sms_link_click`` ``ClickEvent`` on the clickstream, keyed by user."""

from __future__ import annotations

import logging
import uuid
from typing import Final

from aiohttp import web
from confluent_kafka import KafkaException

from processors import metrics
from processors.core.events import MAX_VALUE_LEN, ClickEvent, EventError, validate
from processors.core.links import CLICK_EVENT_TYPE, LinkError, LinkTarget, is_valid_code
from processors.webhooks.context import Context
from processors.webhooks.errors import WebhookError
from schemas.codec import CodecError

log = logging.getLogger("nudgeflow.webhooks")

CLICK_PUBLISH_TIMEOUT_S: Final = 2.0


class Clicks:
    """``GET /l/{code}`` (``HEAD`` redirects without counting a click)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request) -> web.StreamResponse:
        code = request.match_info.get("code", "")
        if not is_valid_code(code):
            raise WebhookError(404, "unknown_link", "no such link")
        record = await self.ctx.run(self.ctx.store.link, code)
        try:
            target = LinkTarget.from_record(record) if record else None
        except LinkError:
            target = None
        if target is None:
            raise WebhookError(404, "unknown_link", "no such link")
        if request.method == "GET":  # HEAD (link previews, checkers) is not a click
            await self._emit_click(target, code)
        metrics.LINK_CLICKS.labels(target.campaign_id, metrics.variant_label(target.variant)).inc()
        raise web.HTTPFound(target.url)

    async def _emit_click(self, target: LinkTarget, code: str) -> None:
        """The click as a clickstream event; a broker hiccup must not break the redirect."""
        props = {
            "decision_id": target.decision_id,
            "campaign_id": target.campaign_id,
            "url": target.url[:MAX_VALUE_LEN],
            "code": code,
        }
        if target.variant:
            props["variant"] = target.variant
        try:
            event = validate(
                ClickEvent(
                    event_id=f"click-{uuid.uuid4().hex}",
                    user_id=target.user_id,
                    event_type=CLICK_EVENT_TYPE,
                    ts=self.ctx.clock(),
                    properties=props,
                )
            )
            await self.ctx.publish(
                self.ctx.settings.topic_clickstream,
                event.user_id,
                "ClickEvent",
                event.to_record(),
                CLICK_PUBLISH_TIMEOUT_S,
            )
        except (TimeoutError, EventError, CodecError, KafkaException, BufferError) as exc:
            log.warning("click on %s not recorded: %s", code, type(exc).__name__)
