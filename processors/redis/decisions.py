"""The policy's records of each decision in Redis: reservation, caps, deferral, the call.

``P{u}:d:<decision_id>`` hash: ``s`` state (reserved|deferred|calling|done), ``t`` attempt token,
``o`` last outcome (JSON), ``e`` status of the last published outcome, ``c`` reason of a
cancellation, ``dl`` set when the outcome is also dead-lettered. ``P{u}:sends`` /
``P{u}:sends:<campaign>`` the caps' rolling windows; ``P{u}:texted`` the first-text claim;
``Pdeferred`` / ``Pdeferred:data`` / ``Pdeferred:lease`` the deferred sends (on a cluster, shards
``P{deferred:<k>}``). Each operation that decides something is one script, so concurrent
dispatchers agree; on a cluster, an operation on a decision and the deferred index is two scripts
(one per slot), ordered so that a crash between them leaves nothing lost (docs/guarantees.md).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from processors.core.cap import GLOBAL_SCOPE, CapRule, longest_window_ms
from processors.core.clock import wall_ms
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import OutcomeError, SmsOutcome
from processors.core.policy import CallPermit, Prior
from processors.redis.base import Call, RedisBase, text

_NEW = Prior("new")
_CLAIMED_MAX = 100_000
_LIVE = (b"deferred", b"reserved", b"calling")


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

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._claimed: set[str] = set()  # cluster: deferred sends this store claimed
        self._next_shard = 0

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
        if self.cluster:
            return self._cancel_on_cluster(cancel, outcome, event_clock)
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

    def _cancel_on_cluster(
        self, cancel: DecisionCancelled, outcome: SmsOutcome, event_clock: bool
    ) -> bool:
        """The decision's part first (it is done from then on), then its index entry goes (a
        crash in between leaves an entry that the next claim drops)."""
        keep = False
        if event_clock:
            deferred, _data, _lease = self.deferred_keys_of(cancel.decision_id)
            due = self.r.zscore(deferred, cancel.decision_id)
            keep = due is not None and due < cancel.at
        done = self._script("cancel_mark")(
            keys=[self.decision_key(cancel.user_id, cancel.decision_id)],
            args=[
                cancel.reason,
                outcome.dumps(),
                self.state_ttl_ms,
                self.emit_grace_ms,
                cancel.at,
                "1" if keep else "0",
            ],
        )
        if done:
            self._drop_deferred([cancel.decision_id])
        return bool(done)

    def _drop_deferred(self, decision_ids: Iterable[str]) -> None:
        """Cluster: done decisions leave the deferred index (one script call per shard)."""
        by_shard: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for did in decision_ids:
            by_shard[self.deferred_keys_of(did)].append(did)
            self._claimed.discard(did)
        calls: list[Call] = [(list(keys), ids) for keys, ids in by_shard.items()]
        if calls:
            self.run_calls("deferred_drop", calls)

    def _release_claims(self, decision_ids: Iterable[str]) -> None:
        """Cluster: drop this store's claims of decisions just finished (a claim another
        instance finished stays until its lease ends; the next claim of it drops it)."""
        claimed = self._claimed
        if claimed:
            self._drop_deferred([did for did in decision_ids if did in claimed])

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
        """Hold the decision until ``due_ms``. On a cluster the index entry is written first,
        then the decision's state (an entry whose decision is not deferred is harmless: a claim
        resumes it only while the decision is live, and its token still decides)."""
        shard = self.deferred_keys_of(decision.decision_id)
        payload = f"{due_ms}|{decision_json(decision)}"
        keys = [self.decision_key(decision.user_id, decision.decision_id)]
        if self.cluster:
            self._script("deferred_add")(
                keys=list(shard), args=[decision.decision_id, due_ms, payload]
            )
            self._claimed.discard(decision.decision_id)
        else:
            keys += shard
        return bool(
            self._script("defer")(
                keys=keys,
                args=[
                    decision.decision_id,
                    due_ms,
                    outcome.dumps(),
                    payload,
                    self.state_ttl_ms,
                    self.emit_grace_ms,
                    token,
                ],
            )
        )

    def claim_due(self, now_ms: int | None, limit: int) -> list[tuple[Decision, int]]:
        """Up to ``limit`` deferred sends due by ``now_ms`` (None: all), leased to the caller.
        On a cluster the shards are visited round-robin from one call to the next, each for
        what the limit leaves."""
        wall = wall_ms()
        args: list[Any] = [
            "+inf" if now_ms is None else now_ms,
            limit,
            wall + self.lease_ms,
            wall,
            "" if self.cluster else self.prefix,
        ]
        if not self.cluster:
            raws = self._script("claim_due")(keys=list(self.deferred_keys), args=args)
        else:
            raws = self._claim_shards(args, limit)
        out = []
        for raw in raws:
            due, _, payload = text(raw).partition("|")  # type: ignore[union-attr]
            out.append((Decision.from_record(json.loads(payload)), int(due)))
        out.sort(key=lambda item: (item[1], item[0].decision_id))
        return out

    def _claim_shards(self, args: list[Any], limit: int) -> list[Any]:
        shards = self.deferred_shards
        start = self._next_shard
        self._next_shard = (start + 1) % len(shards)
        claimed: list[Any] = []
        for i in range(len(shards)):
            if len(claimed) >= limit:
                break
            args[1] = limit - len(claimed)
            shard = shards[(start + i) % len(shards)]
            raws = self._script("claim_due")(keys=list(shard), args=args)
            claimed += self._live_claims(shard, raws)
        return claimed

    def _live_claims(self, shard: tuple[str, str, str], raws: Sequence[Any]) -> list[Any]:
        """The claims whose decision is still deferred, reserved or calling; the others leave
        the index (what ``claim_due.lua`` does in one step on a single Redis)."""
        if not raws:
            return []
        ids = []
        pipe = self.r.pipeline(transaction=False)
        for raw in raws:
            due_payload = text(raw) or ""
            record = json.loads(due_payload.partition("|")[2])
            did = str(record["decision_id"])
            ids.append(did)
            pipe.hget(self.decision_key(str(record["user_id"]), did), "s")
        live: list[Any] = []
        dead: list[Any] = []
        for did, raw, state in zip(ids, raws, pipe.execute(), strict=True):
            if state in _LIVE:
                live.append(raw)
                if len(self._claimed) > _CLAIMED_MAX:
                    self._claimed.clear()  # only an optimisation of finish: see _release_claims
                self._claimed.add(did)
            else:
                dead += (did, raw)
        if dead:
            _deferred, data, lease = shard
            self._script("unclaim")(keys=[data, lease], args=dead)
        return live

    def deferred_count(self) -> int:
        """Deferred sends held, claimed or not (every shard)."""
        pipe = self.r.pipeline(transaction=False)
        for deferred, _data, lease in self.deferred_shards:
            pipe.zcard(deferred)
            pipe.zcard(lease)
        return sum(int(n) for n in pipe.execute())

    def start_call(self, decision: Decision, token: str, as_of: int | None = None) -> CallPermit:
        """The last check before the gateway call (ownership, cancellation, consent, a STOP of
        the number), atomically with taking the call. On a cluster the number's keyword consent
        is in another slot: it is read just before, and the script checks that the profile
        still has that number."""
        key = self.decision_key(decision.user_id, decision.decision_id)
        contact = f"{self.user_key(decision.user_id)}:contact"
        args: list[str | int] = [
            token,
            self.call_lease_ms,
            "" if self.cluster else self.phone_prefix,
            -1 if as_of is None else as_of,
        ]
        for _ in range(16):  # on a cluster, retried only while the profile's number changes
            if self.cluster:
                args[4:] = self._stored_phone_consent(contact)
            permit = text(self._script("start_call")(keys=[key, contact], args=args)) or "lost"
            if permit != "recheck":
                return permit  # type: ignore[return-value]
        raise RuntimeError("contact's number kept changing; call not started")

    def _stored_phone_consent(self, contact_key: str) -> list[str]:
        """[number, its keyword consent status or ''] of the stored profile (cluster)."""
        raw = self.r.hget(contact_key, "v")
        try:
            record = json.loads(raw) if raw is not None else None
        except ValueError:
            record = None
        number = record.get("phone") if isinstance(record, dict) else None
        if not isinstance(number, str):
            return ["", ""]
        return [number, text(self.r.hget(self.phone_prefix + number, "s")) or ""]

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
        keys = [self.decision_key(decision.user_id, decision.decision_id)]
        if not self.cluster:
            _deferred, data, lease = self.deferred_keys
            keys += (lease, data)
        recorded = bool(
            self._script("finish")(
                keys=keys, args=self._finish_args(decision, outcome, sent, token, dead_letter)
            )
        )
        if recorded and self.cluster:
            self._release_claims([decision.decision_id])
        return recorded

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
        calls: list[Call] = [
            ([keys[i] for i in group], [items[i][2] for i in group])
            for group in self.slot_groups(keys)
        ]
        self.run_calls("mark_emitted_many", calls)
