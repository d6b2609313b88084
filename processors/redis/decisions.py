"""The policy's records of each decision in Redis: reservation, caps, deferral, the call.

``P{u}:d:<decision_id>`` hash: ``s`` state (reserved|deferred|calling|done), ``t`` attempt token,
``o`` last outcome (JSON), ``e`` status of the last published outcome, ``c`` reason of a
cancellation, ``dl`` set when the outcome is also dead-lettered. ``P{u}:sends`` /
``P{u}:sends:<campaign>`` the caps' rolling windows; ``P{u}:texted`` the first-text claim;
``Pdeferred`` / ``Pdeferred:data`` / ``Pdeferred:lease`` the deferred sends. Each operation that
decides something is one script, so concurrent dispatchers agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from processors.core.cap import GLOBAL_SCOPE, CapRule, longest_window_ms
from processors.core.clock import wall_ms
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import OutcomeError, SmsOutcome
from processors.core.policy import CallPermit, Prior
from processors.redis.base import RedisBase, text

_NEW = Prior("new")


def prior_of(raw: Sequence[Any]) -> Prior:
    """``Prior`` from the first five fields the ``begin`` script returns."""
    state, outcome, emitted, wait_ms, dead_letter = raw[:5]
    if state == b"new" and not outcome:
        return _NEW  # what nearly every decision finds (a shared immutable value)
    state_s = text(state) or "new"
    if state_s == "busy":
        return Prior("busy", wait_ms=int(wait_ms))
    parsed: SmsOutcome | None = None
    recorded = text(outcome)
    if recorded:
        try:
            parsed = SmsOutcome.loads(recorded)
        except OutcomeError:
            parsed = None
    return Prior(state_s, parsed, bool(emitted), dead_letter=bool(dead_letter))  # type: ignore[arg-type]


def decision_json(d: Decision) -> str:
    rec = d.to_record()
    return json.dumps(rec, separators=(",", ":"), sort_keys=True)


class DecisionRecords(RedisBase):
    """``PolicyStore``'s one-decision operations (each one script call or one read)."""

    def begin(self, decision: Decision, token: str, resume_deferred: bool) -> Prior:
        key = self.decision_key(decision.user_id, decision.decision_id)
        raw = self._script("begin")(
            keys=[key],
            args=[token, "1" if resume_deferred else "0", self.state_ttl_ms, self.emit_grace_ms],
        )
        return prior_of(raw)

    def cancellation(self, decision: Decision, as_of: int | None = None) -> str | None:
        reason, at = self.r.hmget(
            self.decision_key(decision.user_id, decision.decision_id), "c", "ca"
        )
        if reason is None or (as_of is not None and at is not None and int(at) > as_of):
            return None  # event clock: that conversion happens later than this check
        return text(reason)

    def cancel(
        self, cancel: DecisionCancelled, outcome: SmsOutcome, event_clock: bool = False
    ) -> bool:
        deferred, data, _lease = self.deferred_keys
        return bool(
            self._script("cancel")(
                keys=[self.decision_key(cancel.user_id, cancel.decision_id), deferred, data],
                args=[
                    cancel.reason,
                    cancel.decision_id,
                    outcome.dumps(),
                    self.state_ttl_ms,
                    self.emit_grace_ms,
                    cancel.at,
                    "1" if event_clock else "0",
                ],
            )
        )

    def check_caps(
        self, decision: Decision, rules: Sequence[CapRule], now_ms: int, reserve: bool
    ) -> int | None:
        user = self.user_key(decision.user_id)
        longest = longest_window_ms(rules)
        args: list[Any] = [
            decision.decision_id,
            now_ms,
            "1" if reserve else "0",
            max(longest * 2, 60_000),
            now_ms - 2 * longest,
        ]
        for rule in rules:
            args += ["1" if rule.scope == GLOBAL_SCOPE else "0", now_ms - rule.per_ms, rule.max]
        keys = [f"{user}:sends", f"{user}:sends:{decision.campaign_id}"]
        index = int(self._script("check_caps")(keys=keys, args=args))
        return None if index == 0 else index - 1

    def release_caps(self, decision: Decision) -> None:
        user = self.user_key(decision.user_id)
        keys = [f"{user}:sends", f"{user}:sends:{decision.campaign_id}", f"{user}:texted"]
        self._script("release_caps")(keys=keys, args=[decision.decision_id])

    def claim_first_text(self, decision: Decision) -> bool:
        key = f"{self.user_key(decision.user_id)}:texted"
        return bool(self._script("claim_first_text")(keys=[key], args=[decision.decision_id]))

    def defer(self, decision: Decision, due_ms: int, outcome: SmsOutcome, token: str) -> bool:
        deferred, data, lease = self.deferred_keys
        return bool(
            self._script("defer")(
                keys=[
                    self.decision_key(decision.user_id, decision.decision_id),
                    deferred,
                    data,
                    lease,
                ],
                args=[
                    decision.decision_id,
                    due_ms,
                    outcome.dumps(),
                    f"{due_ms}|{decision_json(decision)}",
                    self.state_ttl_ms,
                    self.emit_grace_ms,
                    token,
                ],
            )
        )

    def claim_due(self, now_ms: int | None, limit: int) -> list[tuple[Decision, int]]:
        deferred, data, lease = self.deferred_keys
        wall = wall_ms()
        raws = self._script("claim_due")(
            keys=[deferred, data, lease],
            args=[
                "+inf" if now_ms is None else now_ms,
                limit,
                wall + self.lease_ms,
                wall,
                self.prefix,
            ],
        )
        out = []
        for raw in raws:
            due, _, payload = text(raw).partition("|")  # type: ignore[union-attr]
            out.append((Decision.from_record(json.loads(payload)), int(due)))
        out.sort(key=lambda item: (item[1], item[0].decision_id))
        return out

    def deferred_count(self) -> int:
        deferred, _data, lease = self.deferred_keys
        return int(self.r.zcard(deferred)) + int(self.r.zcard(lease))

    def start_call(self, decision: Decision, token: str, as_of: int | None = None) -> CallPermit:
        key = self.decision_key(decision.user_id, decision.decision_id)
        contact = f"{self.user_key(decision.user_id)}:contact"
        args: list[str | int] = [
            token,
            self.call_lease_ms,
            self.phone_prefix,
            -1 if as_of is None else as_of,
        ]
        return text(self._script("start_call")(keys=[key, contact], args=args)) or "lost"

    def extend_call(self, decision: Decision, token: str) -> bool:
        """Renew the ``calling`` lease before a retry, so no other instance takes it as a crash."""
        key = self.decision_key(decision.user_id, decision.decision_id)
        return bool(self._script("extend_call")(keys=[key], args=[token, self.call_lease_ms]))

    def finish(
        self,
        decision: Decision,
        outcome: SmsOutcome,
        sent: bool,
        token: str,
        dead_letter: bool = False,
    ) -> bool:
        _deferred, data, lease = self.deferred_keys
        return bool(
            self._script("finish")(
                keys=[self.decision_key(decision.user_id, decision.decision_id), lease, data],
                args=self._finish_args(decision, outcome, sent, token, dead_letter),
            )
        )

    def _finish_args(
        self, decision: Decision, outcome: SmsOutcome, sent: bool, token: str, dead_letter: bool
    ) -> list[Any]:
        return [
            outcome.dumps(),
            "1" if sent else "0",
            decision.decision_id,
            self.state_ttl_ms,
            outcome.status,
            self.emit_grace_ms,
            token,
            "1" if dead_letter else "0",
        ]

    def mark_emitted(self, decision: Decision, status: str) -> None:
        self.r.hset(self.decision_key(decision.user_id, decision.decision_id), "e", status)

    def mark_emitted_many(self, items: Sequence[tuple[str, str, str]]) -> None:
        """``(user_id, decision_id, status)`` for each published outcome, in one script call."""
        if not items:
            return
        keys = [self.decision_key(user_id, decision_id) for user_id, decision_id, _status in items]
        self._script("mark_emitted_many")(keys=keys, args=[status for _u, _d, status in items])
