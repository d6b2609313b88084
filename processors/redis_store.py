"""``PolicyStore`` in Redis, shared by every dispatcher instance.

Each decision that decides something is one Lua script, so concurrent dispatchers can neither
exceed a cap nor both call the gateway for one decision. Keys (``P`` = prefix, ``{u}`` = user id
as a hash tag, so one user's keys share a cluster slot):

* ``P{u}:d:<decision_id>`` hash: ``s`` state (reserved|deferred|calling|done), ``t`` attempt
  token, ``o`` last outcome (JSON), ``e`` status of the last published outcome, ``c`` reason of a
  cancellation. Expires after ``state_ttl_ms`` (longer than any redelivery or replay window).
* ``P{u}:sends`` / ``P{u}:sends:<campaign>`` sorted sets: decision ids scored by send time, the
  rolling windows of the caps (``processors.core.cap`` semantics: window ``(now-per, +inf)``).
* ``P{u}:texted``: the decision id that claimed the first text to the contact (the STOP footer
  goes on it only); released again if that text does not go out.
* ``P{u}:contact`` hash: ``v`` the ContactProfile record (JSON), ``o`` its offset on the
  compacted topic (an older offset never overwrites a newer one).
* ``Pdeferred`` sorted set (decision id by due time), ``Pdeferred:data`` hash (decision JSON),
  ``Pdeferred:lease`` sorted set (claimed ids by lease expiry, wall clock): a deferred send
  survives restarts, and a claim lost in a crash returns to ``Pdeferred`` when its lease ends.

The deferred index is global (not per user), so the scripts that touch it are not cluster-safe;
NudgeFlow targets a single Redis (or a primary with replicas) for the dispatcher.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from processors.core.cap import GLOBAL_SCOPE, CapRule, longest_window_ms
from processors.core.contact import Contact, ContactError
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import OutcomeError, SmsOutcome
from processors.core.policy import CallPermit, Prior

DEFAULT_PREFIX = "nudgeflow:"
STATE_TTL_MS = 30 * 86_400_000
LEASE_MS = 60_000
EMIT_GRACE_MS = 5_000
"""How long a recorded outcome may wait for its publication before another instance that gets
the same decision re-publishes it (the owner is then presumed dead)."""

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_BEGIN = (
    _NOW
    + """
local s = redis.call('HGET', KEYS[1], 's')
if (not s) or s == 'reserved' or (s == 'deferred' and ARGV[2] == '1') then
  redis.call('HSET', KEYS[1], 's', 'reserved', 't', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {s or 'new', false, 0, 0}
end
local f = redis.call('HMGET', KEYS[1], 'o', 'os', 'e', 'l')
local emitted = f[2] and f[3] == f[2]
local lease = tonumber(f[4] or '0')
if s == 'calling' or not emitted then
  if lease > now then return {'busy', false, 0, lease - now} end
  -- the previous owner's lease ran out: this attempt takes over (and holds a fresh lease)
  redis.call('HSET', KEYS[1], 't', ARGV[1], 'l', now + ARGV[4])
end
return {s, f[1], emitted and 1 or 0, 0}
"""
)

_CANCEL = (
    _NOW
    + """
redis.call('HSET', KEYS[1], 'c', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('HGET', KEYS[1], 's') == 'deferred' and redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[1], 's', 'done', 'o', ARGV[3], 'os', 'cancelled', 'l', now + ARGV[5])
  redis.call('HDEL', KEYS[1], 'e')
  return 1
end
return 0
"""
)

# KEYS: global sends, campaign sends. ARGV: decision id, now, reserve, ttl, trim_before,
# then per rule: is_global (1/0), exclusive lower bound (now - per), max.
_CAPS = """
local did = ARGV[1]
if redis.call('ZSCORE', KEYS[1], did) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
local n = (#ARGV - 5) / 3
for i = 0, n - 1 do
  local key = KEYS[2]
  if ARGV[6 + 3 * i] == '1' then key = KEYS[1] end
  local used = redis.call('ZCOUNT', key, '(' .. ARGV[7 + 3 * i], '+inf')
  if used >= tonumber(ARGV[8 + 3 * i]) then return i + 1 end
end
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], ARGV[2], did)
  redis.call('ZADD', KEYS[2], ARGV[2], did)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 0
"""

_DEFER = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[7] then return 0 end
redis.call('HSET', KEYS[1], 's', 'deferred', 'o', ARGV[3], 'os', 'deferred', 'l', now + ARGV[6])
redis.call('HDEL', KEYS[1], 'e')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""
)

# KEYS: deferred, data, lease. ARGV: now ('+inf' for all), limit, lease_until, wall_now.
_CLAIM = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
for _, did in ipairs(expired) do
  local raw = redis.call('HGET', KEYS[2], did)
  redis.call('ZREM', KEYS[3], did)
  if raw then
    local due = string.match(raw, '^(%d+)|')
    redis.call('ZADD', KEYS[1], due, did)
  end
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, did in ipairs(ids) do
  redis.call('ZREM', KEYS[1], did)
  local raw = redis.call('HGET', KEYS[2], did)
  if raw then
    local sep = string.find(raw, '|', 1, true)
    local user = cjson.decode(string.sub(raw, sep + 1))['user_id']
    local state = redis.call('HGET', ARGV[5] .. '{' .. user .. '}:d:' .. did, 's')
    if state == 'deferred' or state == 'reserved' or state == 'calling' then
      redis.call('ZADD', KEYS[3], ARGV[3], did)
      table.insert(out, raw)
    else
      redis.call('HDEL', KEYS[2], did)  -- finished meanwhile (or expired): nothing to send
    end
  end
end
return out
"""

_START_CALL = (
    _NOW
    + """
local owner = redis.call('HGET', KEYS[1], 't')
if owner ~= ARGV[1] or redis.call('HGET', KEYS[1], 's') ~= 'reserved' then return 'lost' end
local c = redis.call('HGET', KEYS[1], 'c')
if c then return 'cancelled:' .. c end
redis.call('HSET', KEYS[1], 's', 'calling', 'l', now + ARGV[2])
return 'ok'
"""
)

_EXTEND = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 't', 's')
if f[1] == ARGV[1] and f[2] == 'calling' then
  redis.call('HSET', KEYS[1], 'l', now + ARGV[2])
  return 1
end
return 0
"""
)

# KEYS: decision, lease, data. ARGV: outcome, sent, decision id, ttl, status, grace, token.
_FINISH = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[7] then return 0 end
redis.call('HSET', KEYS[1], 's', 'done', 'o', ARGV[1], 'os', ARGV[5], 'l', now + ARGV[6])
redis.call('HDEL', KEYS[1], 'e')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('ZREM', KEYS[2], ARGV[3]) == 1 then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
"""
)

_CLAIM_FIRST = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
if holder == ARGV[1] then return 1 end
return 0
"""

# KEYS: global sends, campaign sends, first-text claim. ARGV: decision id.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
"""

_PUT_CONTACT = """
local cur = redis.call('HGET', KEYS[1], 'o')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'v', ARGV[2])
end
return 1
"""


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def decision_json(d: Decision) -> str:
    rec = d.to_record()
    return json.dumps(rec, separators=(",", ":"), sort_keys=True)


class RedisStore:
    """``PolicyStore`` over one Redis; thread-safe (redis-py pools connections)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        *,
        state_ttl_ms: int = STATE_TTL_MS,
        lease_ms: int = LEASE_MS,
        call_lease_ms: int = 15_000,
        emit_grace_ms: int = EMIT_GRACE_MS,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.state_ttl_ms = state_ttl_ms
        self.lease_ms = lease_ms
        self.call_lease_ms = call_lease_ms
        self.emit_grace_ms = emit_grace_ms
        self._begin = client.register_script(_BEGIN)
        self._cancel = client.register_script(_CANCEL)
        self._caps = client.register_script(_CAPS)
        self._defer = client.register_script(_DEFER)
        self._claim = client.register_script(_CLAIM)
        self._start = client.register_script(_START_CALL)
        self._finish = client.register_script(_FINISH)
        self._extend = client.register_script(_EXTEND)
        self._claim_first = client.register_script(_CLAIM_FIRST)
        self._release = client.register_script(_RELEASE)
        self._put_contact = client.register_script(_PUT_CONTACT)

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX, **kw: Any) -> RedisStore:
        return cls(redis.Redis.from_url(url), prefix, **kw)

    # -- keys -----------------------------------------------------------------------------------

    def _user(self, user_id: str) -> str:
        return f"{self.prefix}{{{user_id}}}"

    def _dkey(self, user_id: str, decision_id: str) -> str:
        return f"{self._user(user_id)}:d:{decision_id}"

    @property
    def _deferred(self) -> tuple[str, str, str]:
        base = f"{self.prefix}deferred"
        return base, f"{base}:data", f"{base}:lease"

    # -- contacts -------------------------------------------------------------------------------

    def put_contact(self, user_id: str, record: dict[str, Any] | None, offset: int) -> bool:
        """Store the profile at ``offset`` of the contacts topic (None = tombstone: delete)."""
        value = "" if record is None else json.dumps(record, separators=(",", ":"))
        return bool(
            self._put_contact(keys=[f"{self._user(user_id)}:contact"], args=[offset, value])
        )

    def contact(self, user_id: str) -> Contact | None:
        raw = self.r.hget(f"{self._user(user_id)}:contact", "v")
        if raw is None:
            return None
        try:
            return Contact.from_record(json.loads(raw))
        except (ContactError, ValueError):
            return None  # unreadable profile: treated as no contact (never texted)

    # -- PolicyStore ----------------------------------------------------------------------------

    def begin(self, decision: Decision, token: str, resume_deferred: bool) -> Prior:
        key = self._dkey(decision.user_id, decision.decision_id)
        state, outcome, emitted, wait_ms = self._begin(
            keys=[key],
            args=[token, "1" if resume_deferred else "0", self.state_ttl_ms, self.emit_grace_ms],
        )
        state_s = _text(state) or "new"
        if state_s == "busy":
            return Prior("busy", wait_ms=int(wait_ms))
        parsed: SmsOutcome | None = None
        raw = _text(outcome)
        if raw:
            try:
                parsed = SmsOutcome.loads(raw)
            except OutcomeError:
                parsed = None
        return Prior(state_s, parsed, bool(emitted))  # type: ignore[arg-type]

    def cancellation(self, decision: Decision) -> str | None:
        return _text(self.r.hget(self._dkey(decision.user_id, decision.decision_id), "c"))

    def cancel(self, cancel: DecisionCancelled, outcome: SmsOutcome) -> bool:
        deferred, data, _lease = self._deferred
        return bool(
            self._cancel(
                keys=[self._dkey(cancel.user_id, cancel.decision_id), deferred, data],
                args=[
                    cancel.reason,
                    cancel.decision_id,
                    outcome.dumps(),
                    self.state_ttl_ms,
                    self.emit_grace_ms,
                ],
            )
        )

    def check_caps(
        self, decision: Decision, rules: Sequence[CapRule], now_ms: int, reserve: bool
    ) -> int | None:
        user = self._user(decision.user_id)
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
        index = int(self._caps(keys=keys, args=args))
        return None if index == 0 else index - 1

    def release_caps(self, decision: Decision) -> None:
        user = self._user(decision.user_id)
        keys = [f"{user}:sends", f"{user}:sends:{decision.campaign_id}", f"{user}:texted"]
        self._release(keys=keys, args=[decision.decision_id])

    def claim_first_text(self, decision: Decision) -> bool:
        key = f"{self._user(decision.user_id)}:texted"
        return bool(self._claim_first(keys=[key], args=[decision.decision_id]))

    def defer(self, decision: Decision, due_ms: int, outcome: SmsOutcome, token: str) -> bool:
        deferred, data, lease = self._deferred
        return bool(
            self._defer(
                keys=[self._dkey(decision.user_id, decision.decision_id), deferred, data, lease],
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
        deferred, data, lease = self._deferred
        wall = time.time_ns() // 1_000_000
        raws = self._claim(
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
            due, _, payload = _text(raw).partition("|")  # type: ignore[union-attr]
            out.append((Decision.from_record(json.loads(payload)), int(due)))
        out.sort(key=lambda item: (item[1], item[0].decision_id))
        return out

    def deferred_count(self) -> int:
        deferred, _data, lease = self._deferred
        return int(self.r.zcard(deferred)) + int(self.r.zcard(lease))

    def start_call(self, decision: Decision, token: str) -> CallPermit:
        key = self._dkey(decision.user_id, decision.decision_id)
        return _text(self._start(keys=[key], args=[token, self.call_lease_ms])) or "lost"

    def extend_call(self, decision: Decision, token: str) -> bool:
        """Renew the ``calling`` lease before a retry, so no other instance takes it as a crash."""
        key = self._dkey(decision.user_id, decision.decision_id)
        return bool(self._extend(keys=[key], args=[token, self.call_lease_ms]))

    def finish(self, decision: Decision, outcome: SmsOutcome, sent: bool, token: str) -> bool:
        _deferred, data, lease = self._deferred
        return bool(
            self._finish(
                keys=[self._dkey(decision.user_id, decision.decision_id), lease, data],
                args=[
                    outcome.dumps(),
                    "1" if sent else "0",
                    decision.decision_id,
                    self.state_ttl_ms,
                    outcome.status,
                    self.emit_grace_ms,
                    token,
                ],
            )
        )

    def mark_emitted(self, decision: Decision, status: str) -> None:
        self.r.hset(self._dkey(decision.user_id, decision.decision_id), "e", status)

    def mark_emitted_many(self, items: Sequence[tuple[str, str, str]]) -> None:
        """``(user_id, decision_id, status)`` for each published outcome, in one round trip."""
        if not items:
            return
        pipe = self.r.pipeline(transaction=False)
        for user_id, decision_id, status in items:
            pipe.hset(self._dkey(user_id, decision_id), "e", status)
        pipe.execute()
