"""Frequency caps: at most ``max`` texts per rolling ``per`` window, globally or per campaign.

Semantics (the Redis shell implements exactly these in Lua; keep both in step):

* A send is recorded as ``(campaign_id, at_ms)`` when it is accepted for delivery.
* A rule counts the recorded sends with ``at_ms > now_ms - per_ms``: the window is the half-open
  interval ``(now - per, now]``, so a send exactly ``per`` ago no longer counts (with
  ``1 per 4h`` and a send at ``t``, the next send is allowed at ``t + 4h`` exactly, refused at
  ``t + 4h - 1ms``). Sends stamped *after* ``now`` (clock skew between dispatchers, replays)
  also count: skew must never open a hole in a cap. In Redis terms:
  ``ZCOUNT key (now-per +inf`` on a sorted set scored by ``at_ms``.
* A ``global`` rule counts every send to the recipient; a campaign rule (``scope`` = campaign
  id) counts only that campaign's sends.
* A rule is violated when its count is already ``>= max`` (one more send would exceed it).
  Rules are checked in the order given; the first violated one is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from processors.core.durations import format_duration, parse_duration

GLOBAL_SCOPE = "global"


class CapError(ValueError):
    """A cap rule in a campaign file (or the global settings) is malformed."""


@dataclass(frozen=True)
class CapRule:
    max: int
    per_ms: int
    scope: str  # "global" or a campaign id

    def describe(self) -> str:
        """Human-readable, e.g. ``1 per 4h``."""
        return f"{self.max} per {format_duration(self.per_ms)}"

    def counts(self, send: SendRecord) -> bool:
        """Whether ``send`` belongs to this rule's scope (time is checked separately)."""
        return self.scope == GLOBAL_SCOPE or send.campaign_id == self.scope


@dataclass(frozen=True)
class SendRecord:
    campaign_id: str
    at_ms: int


def rule_key(rule: CapRule) -> str:
    """Stable identifier for outcomes and metrics, e.g. ``global:1/4h`` or ``cart-abandon:2/1d``."""
    return f"{rule.scope}:{rule.max}/{format_duration(rule.per_ms)}"


def check_caps(
    rules: Iterable[CapRule],
    sends: Sequence[SendRecord],
    now_ms: int,
    campaign_id: str | None = None,
) -> CapRule | None:
    """Return the first rule that one more send at ``now_ms`` would violate, else ``None``.

    When ``campaign_id`` is given, rules scoped to *other* campaigns are skipped, so callers may
    pass every rule they know of.
    """
    for rule in rules:
        if campaign_id is not None and rule.scope not in (GLOBAL_SCOPE, campaign_id):
            continue
        start = now_ms - rule.per_ms
        used = sum(1 for send in sends if send.at_ms > start and rule.counts(send))
        if used >= rule.max:
            return rule
    return None


def longest_window_ms(rules: Iterable[CapRule]) -> int:
    """How long send records must be kept for these rules (0 when there are none)."""
    return max((rule.per_ms for rule in rules), default=0)


def parse_caps(raw: Any, scope: str) -> list[CapRule]:
    """Parse ``[{max: 1, per: 4h}, ...]`` for ``scope`` (``"global"`` or a campaign id).

    ``None`` means no caps. Errors name the rule index and field: ``caps[1].per: ...``.
    """
    if not isinstance(scope, str) or not scope:
        raise CapError(f"cap scope must be 'global' or a campaign id, got {scope!r}")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise CapError(f"caps must be a list like [{{max: 1, per: 4h}}], got {type(raw).__name__}")
    rules: list[CapRule] = []
    for index, item in enumerate(raw):
        where = f"caps[{index}]"
        if not isinstance(item, dict):
            raise CapError(f"{where}: expected a mapping like {{max: 1, per: 4h}}")
        unknown = sorted(set(item) - {"max", "per"})
        if unknown:
            raise CapError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
        for field in ("max", "per"):
            if field not in item:
                raise CapError(f"{where}.{field}: required")
        count = item["max"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise CapError(f"{where}.max: must be a positive integer, got {count!r}")
        try:
            per_ms = parse_duration(item["per"])
        except ValueError as exc:
            raise CapError(f"{where}.per: {exc}") from None
        if per_ms <= 0:
            raise CapError(f"{where}.per: must be longer than 0")
        rules.append(CapRule(max=count, per_ms=per_ms, scope=scope))
    return rules
