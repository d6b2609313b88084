"""Delivery receipts: the parts of a text folded into one state, published once per state.

The client-ref is our decision id; the dispatcher records what it refers to right before the
gateway call (``RedisStore.remember_send``). The receipts of a multipart text are folded into
one state (:mod:`processors.core.receipts`) and published as ``DeliveryReceipt`` on
``sms-delivery``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from processors import metrics
from processors.core import receipts
from processors.webhooks.context import Context
from processors.webhooks.errors import WebhookError
from processors.webhooks.inbound import REPLY_PREFIX
from processors.webhooks.params import Receipt


def receipt_record(
    receipt: Receipt,
    ref: Any,
    group: str,
    parts: Mapping[str, Mapping[str, Any]],
    folded: receipts.Folded,
    received_at: int,
) -> dict[str, Any]:
    """The ``DeliveryReceipt`` record of a folded state."""
    deciding = [p for p in parts.values() if p.get("s") == folded.status]
    err = next((p.get("e") for p in deciding if p.get("e") not in (None, "", "0")), None)
    complete = len(parts) >= folded.parts
    return {
        "receipt_id": f"{group}:{folded.status}",
        "decision_id": receipt.client_ref,
        "matched": ref is not None,
        "user_id": ref.user_id if ref else None,
        "campaign_id": ref.campaign_id if ref else None,
        "variant": ref.variant if ref else None,
        "status": folded.status,
        "final": folded.final,
        "parts": folded.parts,
        "delivered_parts": folded.delivered_parts,
        "message_ids": sorted(parts),
        "err_code": err or (receipt.err_code if receipt.err_code not in (None, "0") else None),
        "network_code": receipt.network_code,
        "price": receipts.sum_prices(p.get("p") for p in parts.values()) if complete else None,
        "carrier_at": receipt.carrier_at,
        "received_at": received_at,
    }


class DeliveryReceipts:
    """``/webhooks/vonage/delivery``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, receipt: Receipt) -> None:
        key = f"dlr:{receipt.message_id}:{receipt.status}"
        await self.ctx.once(key, "receipt", lambda: self._apply(receipt))

    async def _apply(self, receipt: Receipt) -> None:
        ctx = self.ctx
        ref = await ctx.run(ctx.store.sent_ref, receipt.client_ref) if receipt.client_ref else None
        if ref is None and receipt.client_ref and not receipt.client_ref.startswith(REPLY_PREFIX):
            # Not a text we know (yet): refuse without a trace. Vonage retries a non-2xx
            # receipt, so one that beat the dispatcher's send record matches on a retry.
            raise WebhookError(404, "unknown_client_ref", "no NudgeFlow text has this client-ref")
        group = receipt.client_ref or f"msg:{receipt.message_id}"
        parts = await ctx.run(
            ctx.state.record_part, group, receipt.message_id, receipt.part_record()
        )
        folded = receipts.fold(
            {mid: str(p.get("s")) for mid, p in parts.items()}, ref.segments if ref else 1
        )
        if not folded.final and receipt.status not in receipts.PENDING:
            return  # e.g. part 1 of 2 delivered: nothing new to say until the text is complete
        previous = await ctx.run(ctx.state.raise_rank, group, folded.rank)
        if previous < 0:
            return  # this state (or a later one) is already published
        record = receipt_record(receipt, ref, group, parts, folded, ctx.clock())
        try:
            await ctx.publish(
                ctx.settings.topic_delivery,
                ref.user_id if ref else None,
                "DeliveryReceipt",
                record,
            )
        except BaseException:
            await ctx.run(ctx.state.lower_rank, group, folded.rank, previous)
            raise
        if folded.final:
            campaign = ref.campaign_id if ref else "unknown"
            metrics.DELIVERY_RECEIPTS.labels(campaign, folded.status).inc()

    # ------------------------------------------------------------------ inbound texts
