"""Experiments: copy and send-timing variants, and holdouts (control groups).

Assignment is a pure function of (campaign id, user id): stable for the user across episodes,
identical in the worker, the dispatcher, the backtest and the report, with no state to store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from processors.core.campaign import Campaign, Message, Trigger


@dataclass(frozen=True, slots=True)
class Assignment:
    variant: str | None
    holdout: bool


def bucket(salt: str, campaign_id: str, user_id: str) -> float:
    """A uniform number in [0, 1) from a hash; the salt keeps variant and holdout independent."""
    digest = hashlib.blake2b(f"{salt}\x1f{campaign_id}\x1f{user_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64


def in_holdout(campaign: Campaign, user_id: str) -> bool:
    return campaign.holdout > 0 and bucket("holdout", campaign.id, user_id) < campaign.holdout


def variant_id(campaign: Campaign, user_id: str) -> str | None:
    """The user's variant by the campaign's weights, or None when it has no variants."""
    variants = campaign.variants
    if not variants:
        return None
    total = sum(v.weight for v in variants)
    point = bucket("variant", campaign.id, user_id) * total
    for v in variants:
        point -= v.weight
        if point < 0:
            return v.id
    return variants[-1].id


def assign(campaign: Campaign, user_id: str) -> Assignment:
    return Assignment(variant_id(campaign, user_id), in_holdout(campaign, user_id))


def trigger_for(campaign: Campaign, variant: str | None) -> Trigger:
    for v in campaign.variants:
        if v.id == variant:
            return v.trigger
    return campaign.trigger


def message_for(campaign: Campaign, variant: str | None) -> Message:
    for v in campaign.variants:
        if v.id == variant:
            return v.message
    return campaign.message
