"""Inbound texts: STOP/START change consent at once, HELP gets the help text, anything else
goes to ``sms-inbound``.

STOP-class keywords opt the number out in Redis *before* the answer (the dispatcher's consent
check and its last check before every gateway call read it), update every profile with that
number on ``contacts`` and send one confirmation; HELP-class get the help text; START-class opt
back in with a confirmation. A STOP from a number no profile has is still recorded by phone and
overrides every profile that later arrives with that number, until the number texts START.
Concatenated texts: the keyword is read from part 1; parts 2+ always go to ``sms-inbound``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Final

from processors import metrics
from processors.core.contact import Contact
from processors.core.keywords import KeywordKind, classify, first_word
from processors.core.policy import RetryPolicy
from processors.core.rendering import measure
from processors.core.sms import GatewayError, RetryableGatewayError, SmsMessage
from processors.gateways.base import Gateway
from processors.redis import RedisStore
from processors.redis.rate_limit import RateLimiter
from processors.settings import Settings
from processors.webhooks.context import Context
from processors.webhooks.params import Inbound

log = logging.getLogger("nudgeflow.webhooks")

KEYWORD_CAMPAIGN: Final = "keyword-reply"
REPLY_PREFIX: Final = "kw-"


def reply_client_ref(message_id: str) -> str:
    """client-ref of the reply to an inbound message (≤ 100 chars, no personal data)."""
    return REPLY_PREFIX + hashlib.blake2b(message_id.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class Replies:
    """What we answer to HELP, STOP and START (settings ``help_text`` and the confirmations)."""

    help: str = Settings.model_fields["help_text"].default
    stop: str = Settings.model_fields["stop_confirmation_text"].default
    start: str = Settings.model_fields["start_confirmation_text"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> Replies:
        return cls(
            settings.help_text, settings.stop_confirmation_text, settings.start_confirmation_text
        )


@dataclass(slots=True)
class InboundAction:
    """What an inbound text did (``apply_inbound``); the caller publishes and replies."""

    kind: KeywordKind
    phone: str
    user_ids: list[str]
    contacts: list[Contact] = field(default_factory=list)  # updated profiles for ``contacts``
    reply: str | None = None  # text to send back to ``phone``
    applied: bool = True  # False: an older keyword than the one already recorded


def apply_inbound(
    store: RedisStore,
    text: str | None,
    phone: str,
    at_ms: int,
    replies: Replies | None = None,
) -> InboundAction:
    """Apply one inbound text of ``phone`` (E.164) at ``at_ms`` to the consent state in Redis.

    STOP-class: the number is opted out at once (phone-level record, then each profile with that
    number in place); START-class: opted back in. ``at_ms`` orders keywords, so a retried older
    STOP cannot undo a newer START; the demo calls this in event time. Publishing the returned
    ``contacts`` and sending ``reply`` are the caller's job.
    """
    replies = replies or Replies()
    kind = classify(text)
    users = store.users_for_phone(phone)
    if kind == "help":
        return InboundAction(kind, phone, users, reply=replies.help)
    if kind == "other":
        return InboundAction(kind, phone, users)
    status = "opted_out" if kind == "stop" else "opted_in"
    source = f"sms:{first_word(text)}"
    if not store.set_phone_consent(phone, status, at_ms, source):  # type: ignore[arg-type]
        return InboundAction(kind, phone, users, applied=False)
    contacts = []
    for user in users:
        updated = store.set_consent(user, status, at_ms, source, phone=phone)  # type: ignore[arg-type]
        if updated is not None:
            contacts.append(updated)
    reply = replies.stop if kind == "stop" else replies.start
    return InboundAction(kind, phone, users, contacts, reply)


class InboundTexts:
    """``/webhooks/vonage/inbound``, and the confirmations it sends (rate-limited like the
    dispatcher's texts)."""

    def __init__(
        self,
        ctx: Context,
        gateway: Gateway,
        limiter: RateLimiter,
        retry: RetryPolicy,
        replies: Replies,
    ) -> None:
        self.ctx = ctx
        self.gateway = gateway
        self.limiter = limiter
        self.retry = retry
        self.replies = replies
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, message: Inbound) -> None:
        key = f"in:{message.message_id}"
        await self.ctx.once(key, "message", lambda: self._apply(message))

    async def _apply(self, message: Inbound) -> None:
        ctx = self.ctx
        now = ctx.clock()
        # The gateway's time orders keywords (a retried old STOP must not undo a newer START);
        # never later than now, or a bogus future time would pin the consent forever.
        stamp = message.message_timestamp
        at = min(stamp, now) if stamp is not None else now
        text = message.text if message.keyword_part else ""
        action: InboundAction = await ctx.run(
            apply_inbound, ctx.store, text, message.phone, at, self.replies
        )
        if action.kind == "other":
            user = action.user_ids[0] if action.user_ids else None
            await ctx.publish(
                ctx.settings.topic_inbound, user, "InboundSms", message.to_record(user, now)
            )
            return
        if action.contacts:
            await asyncio.gather(
                *(
                    ctx.publish(
                        ctx.settings.topic_contacts, c.user_id, "ContactProfile", c.to_record()
                    )
                    for c in action.contacts
                )
            )
        if action.kind == "stop" and action.applied:
            campaigns = [await ctx.run(ctx.store.last_campaign, u) for u in action.user_ids]
            for campaign in campaigns or [None]:
                metrics.OPT_OUTS.labels(campaign or "unknown").inc()
            log.info("opt-out recorded for %d profile(s)", len(action.user_ids))
        if action.reply and await ctx.run(ctx.state.claim_reply, message.message_id):
            user = action.user_ids[0] if action.user_ids else "-"
            reply = SmsMessage(
                decision_id=reply_client_ref(message.message_id),
                campaign_id=KEYWORD_CAMPAIGN,
                user_id=user,
                to=message.phone,
                text=action.reply,
                sent_at_ms=now,
                segments=measure(action.reply).segments,
                encoding=measure(action.reply).encoding,
            )
            task = asyncio.get_running_loop().create_task(self._send_reply(reply))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send_reply(self, msg: SmsMessage) -> None:
        outcome = await self.ctx.run(self._send_reply_sync, msg)
        if outcome == "sent":
            self.sent += 1
        else:
            log.warning("keyword reply %s not sent: %s", msg.decision_id, outcome)

    def _send_reply_sync(self, msg: SmsMessage) -> str:
        """Rate-limited like the dispatcher's texts; retryable errors are retried with backoff."""
        reason = "not_attempted"
        for attempt in range(max(1, self.retry.attempts)):
            self.limiter.acquire()
            try:
                self.gateway.send(msg)
                return "sent"
            except RetryableGatewayError as exc:
                reason = exc.reason
            except GatewayError as exc:
                return exc.reason
            except Exception as exc:  # noqa: BLE001 - never crash the service for a reply
                return f"unexpected_error:{type(exc).__name__}"
            finally:
                self.limiter.done()  # answered: the rate limit's lease ends (rate_limit.py)
            if attempt + 1 < self.retry.attempts:
                time.sleep(self.retry.delay_s(attempt))
        return reason

    async def wait_replies(self) -> None:
        """Wait for the confirmations in flight (tests, shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
