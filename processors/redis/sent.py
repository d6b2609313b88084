"""What the webhooks look up: the texts sent (by client-ref) and the short links.

``Psent:<decision_id>`` (user, campaign, variant, segments) and ``P{u}:last`` (the campaign of
the user's last text), written right before a gateway call; ``Plink:<code>`` a short link's
target, until the link TTL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from processors.core.decision import Decision
from processors.redis.base import RedisBase, text


@dataclasses.dataclass(frozen=True, slots=True)
class SentRef:
    """What a client-ref (decision id) of a sent text refers to."""

    decision_id: str
    user_id: str
    campaign_id: str
    variant: str | None
    segments: int


class SentTexts(RedisBase):
    """Client-refs of sent texts and short links."""

    def remember_send(self, decision: Decision, segments: int) -> None:
        """Before the gateway call: map the client-ref (decision id) to user and campaign, so
        a delivery receipt, which may beat the call's own answer, can be matched."""
        pipe = self.r.pipeline(transaction=False)
        key = f"{self.prefix}sent:{decision.decision_id}"
        fields = {
            "u": decision.user_id,
            "c": decision.campaign_id,
            "v": decision.variant or "",
            "n": int(segments),
        }
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.pexpire(key, self.state_ttl_ms)
        pipe.set(
            f"{self.user_key(decision.user_id)}:last", decision.campaign_id, px=self.state_ttl_ms
        )
        pipe.execute()

    def sent_ref(self, decision_id: str) -> SentRef | None:
        raw = self.r.hgetall(f"{self.prefix}sent:{decision_id}")
        if not raw:
            return None
        f = {text(k): text(v) for k, v in raw.items()}  # type: ignore[union-attr]
        user, campaign, segments = f.get("u"), f.get("c"), f.get("n")
        if not user or not campaign or not segments or not segments.isdigit():
            return None
        return SentRef(decision_id, user, campaign, f.get("v") or None, int(segments))

    def last_campaign(self, user_id: str) -> str | None:
        """Campaign of the last text sent to ``user_id`` (within the state TTL)."""
        return text(self.r.get(f"{self.user_key(user_id)}:last"))

    def put_link(self, code: str, record: Mapping[str, str], ttl_ms: int) -> dict[str, str]:
        """Store a short link unless ``code`` is taken; returns the record under ``code``."""
        value = json.dumps(dict(record), separators=(",", ":"), sort_keys=True)
        stored = self._script("put_link")(
            keys=[f"{self.prefix}link:{code}"], args=[value, int(ttl_ms)]
        )
        return dict(json.loads(text(stored) or "{}"))

    def link(self, code: str) -> dict[str, str] | None:
        raw = self.r.get(f"{self.prefix}link:{code}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None
