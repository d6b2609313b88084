"""``PolicyStore`` in Redis, shared by every dispatcher instance.

Each decision that decides something is one Lua script, so concurrent dispatchers can neither
exceed a cap nor both call the gateway for one decision. Keys (``P`` = prefix, ``{u}`` = user id
as a hash tag, so one user's keys share a cluster slot):

* ``P{u}:d:<decision_id>`` hash: ``s`` state (reserved|deferred|calling|done), ``t`` attempt
  token, ``o`` last outcome (JSON), ``e`` status of the last published outcome, ``c`` reason of a
  cancellation, ``dl`` set when the outcome is also dead-lettered (a redelivery that re-publishes
  the outcome re-produces the dead letter too). Expires after ``state_ttl_ms`` (longer than any
  redelivery or replay window).
* ``P{u}:sends`` / ``P{u}:sends:<campaign>`` sorted sets: decision ids scored by send time, the
  rolling windows of the caps (``processors.core.cap`` semantics: window ``(now-per, +inf)``).
* ``P{u}:texted``: the decision id that claimed the first text to the contact (the STOP footer
  goes on it only); released again if that text does not go out.
* ``P{u}:contact`` hash: ``v`` the ContactProfile record (JSON), ``o`` its offset on the
  compacted topic (an older offset never overwrites a newer one), ``p`` "<offset>|<phone>" (the
  batch script's consent lookup without decoding ``v``; valid only while ``o`` is that offset,
  so profiles stored without it, or by an older version, are still read from ``v``).
* ``Pdeferred`` sorted set (decision id by due time), ``Pdeferred:data`` hash (decision JSON),
  ``Pdeferred:lease`` sorted set (claimed ids by lease expiry, wall clock): a deferred send
  survives restarts, and a claim lost in a crash returns to ``Pdeferred`` when its lease ends.

Written by the webhook service (``processors.webhooks``), read by the dispatcher:

* ``Pphone:<e164>`` hash: ``s`` consent the handset gave by keyword (opted_out|opted_in), ``at``
  its time, ``src`` the keyword. A STOP here overrides every profile of that number (also ones
  imported later) until a START from the same number: :meth:`RedisStore.contact` and the last
  check before the gateway call both read it. Kept without expiry.
* ``Pphone:<e164>:users`` set of user ids with that number, ``P{u}:phone`` the indexed number.
* ``Psent:<decision_id>`` hash (``u`` user, ``c`` campaign, ``v`` variant, ``n`` segments): what a
  delivery receipt's client-ref refers to; ``P{u}:last`` the campaign of the user's last text.
* ``Plink:<code>`` JSON of a short link's target (expires after the link TTL).

The deferred index is global (not per user), so the scripts that touch it are not cluster-safe;
nor are the batch scripts (``prepare_many``, ``settle_many``, ``mark_emitted_many``: one call for
the keys of many users, each decision's part exactly as on its own). NudgeFlow targets a single
Redis (or a primary with replicas) for the dispatcher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any, cast

import orjson
import redis

from processors.core.cap import GLOBAL_SCOPE, CapRule, longest_window_ms
from processors.core.contact import Consent, Contact, ContactError
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import OutcomeError, SmsOutcome
from processors.core.policy import CallPermit, CapCheck, Final, Prefetched, Prior

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # redis-py without hiredis: its own packer
    _pack_command = None

log = logging.getLogger(__name__)

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

# The reservation (``PolicyStore.begin``) as a Lua function, shared by ``_BEGIN`` and the batch
# script. An attempt asking again with its own token (a batch cut short, see ``_SETTLE_MANY``) is
# not "busy" with itself.
_BEGIN_FN = """
local function begin_from(key, s, token, resume, ttl, grace, now)
  if (not s) or s == 'reserved' or (s == 'deferred' and resume == '1') then
    redis.call('HSET', key, 's', 'reserved', 't', token)
    redis.call('PEXPIRE', key, ttl)
    return {s or 'new', false, 0, 0, false}
  end
  local f = redis.call('HMGET', key, 'o', 'os', 'e', 'l', 'dl', 't')
  local emitted = f[2] and f[3] == f[2]
  local lease = tonumber(f[4] or '0')
  if s == 'calling' or not emitted then
    if lease > now and f[6] ~= token then return {'busy', false, 0, lease - now, false} end
    -- the previous owner's lease ran out: this attempt takes over (and holds a fresh lease)
    redis.call('HSET', key, 't', token, 'l', now + grace)
  end
  return {s, f[1], emitted and 1 or 0, 0, f[5]}
end
local function begin(key, token, resume, ttl, grace, now)
  return begin_from(key, redis.call('HGET', key, 's'), token, resume, ttl, grace, now)
end
"""

_BEGIN = _NOW + _BEGIN_FN + "return begin(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], now)\n"

# KEYS: per decision its state hash and its user's contact hash. ARGV: state ttl, grace, the
# phone key prefix, then one token per decision. For each decision, in order: ``begin`` (not
# resuming deferred sends) plus the policy's reads (profile, the keyword consent of its number,
# cancellation) at the same instant (``begin`` changes neither the profile nor the
# cancellation, so they are read with its state). One script for a whole batch: the per-call
# overhead of a script (in Redis and in redis-py) is most of the cost of a decision's few
# commands. The reply is flat: 11 values per decision. The profile's number is its ``p``
# field when that was written with the profile at its offset ``o`` (see ``put_contact``), else
# read from the profile's JSON.
_PREPARE_MANY = (
    _NOW
    + _BEGIN_FN
    + """
local out = {}
for i = 1, #ARGV - 3 do
  local dkey, ckey = KEYS[2 * i - 1], KEYS[2 * i]
  local c = redis.call('HMGET', dkey, 's', 'c', 'ca')
  local b = begin_from(dkey, c[1], ARGV[3 + i], '0', ARGV[1], ARGV[2], now)
  local cf = redis.call('HMGET', ckey, 'v', 'o', 'p')
  local v, phone = cf[1], nil
  if v then
    local at = cf[3] and cf[2] and string.find(cf[3], '|', 1, true)
    if at and string.sub(cf[3], 1, at - 1) == cf[2] then
      phone = string.sub(cf[3], at + 1)
    else
      local ok, rec = pcall(cjson.decode, v)
      if ok and type(rec) == 'table' and type(rec['phone']) == 'string' then
        phone = rec['phone']
      end
    end
  end
  local p = {false, false, false}
  if phone then p = redis.call('HMGET', ARGV[3] .. phone, 's', 'at', 'src') end
  local o = 11 * i - 11  -- one flat reply: a table per decision costs Redis more
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = b[1], b[2], b[3], b[4], b[5]
  out[o + 6], out[o + 7], out[o + 8], out[o + 9] = v, p[1], p[2], p[3]
  out[o + 10], out[o + 11] = c[2], c[3]
end
return out
"""
)

_CANCEL = (
    _NOW
    + """
-- ARGV[6]: the cancel's time. Event clock (ARGV[7] = 1): a send deferred to before that time
-- went out before the conversion, so it stays; later checks compare 'ca' with their own time.
redis.call('HSET', KEYS[1], 'c', ARGV[1], 'ca', ARGV[6])
if ARGV[7] == '1' then
  local due = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if due and tonumber(due) < tonumber(ARGV[6]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    return 0
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('HGET', KEYS[1], 's') == 'deferred' and redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HSET', KEYS[1], 's', 'done', 'o', ARGV[3], 'os', 'cancelled', 'l', now + ARGV[5])
  redis.call('HDEL', KEYS[1], 'e', 'dl')
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
redis.call('HDEL', KEYS[1], 'e', 'dl')
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
local state = redis.call('HGET', KEYS[1], 's')
if owner == ARGV[1] and state == 'calling' then
  -- this attempt's own earlier call whose answer was lost (Redis went away): the gateway has
  -- not been called yet (that comes after this script answers), so go ahead
  redis.call('HSET', KEYS[1], 'l', now + ARGV[2])
  return 'ok'
end
if owner ~= ARGV[1] or state ~= 'reserved' then return 'lost' end
local c = redis.call('HGET', KEYS[1], 'c')
local as_of = tonumber(ARGV[4])
if c and (as_of < 0 or tonumber(redis.call('HGET', KEYS[1], 'ca') or '0') <= as_of) then
  return 'cancelled:' .. c
end
-- consent once more, atomically with the call: a STOP answered since the policy's check wins
local v = redis.call('HGET', KEYS[2], 'v')
if v then
  local ok, rec = pcall(cjson.decode, v)
  if ok and type(rec) == 'table' then
    local consent = type(rec['consent']) == 'table' and rec['consent']['status'] or nil
    if consent ~= 'opted_in' then
      return 'cancelled:' .. (consent == 'opted_out' and 'opted_out' or 'no_consent')
    end
    if type(rec['phone']) == 'string'
      and redis.call('HGET', ARGV[3] .. rec['phone'], 's') == 'opted_out' then
      return 'cancelled:opted_out'
    end
  end
end
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

# Record a final outcome if ``token`` still owns the decision (``PolicyStore.finish``).
_FINISH_FN = """
local function finish(key, did, outcome, status, token, dl, ttl, grace, now, lease, data)
  if redis.call('HGET', key, 't') ~= token then return 0 end
  redis.call('HSET', key, 's', 'done', 'o', outcome, 'os', status, 'l', now + grace)
  if dl == '1' then
    redis.call('HSET', key, 'dl', '1')
    redis.call('HDEL', key, 'e')
  else
    redis.call('HDEL', key, 'e', 'dl')
  end
  redis.call('PEXPIRE', key, ttl)
  if redis.call('ZREM', lease, did) == 1 then redis.call('HDEL', data, did) end
  return 1
end
"""

# KEYS: decision, lease, data. ARGV: outcome, sent, decision id, ttl, status, grace, token,
# dead-lettered (1/0).
_FINISH = (
    _NOW
    + _FINISH_FN
    + """
return finish(KEYS[1], ARGV[3], ARGV[1], ARGV[5], ARGV[7], ARGV[8], ARGV[4], ARGV[6], now,
  KEYS[2], KEYS[3])
"""
)

# KEYS: lease, data, then per item: a Final's decision hash, or a CapCheck's global sends,
# campaign sends and decision hash. ARGV: most passes, state ttl, grace, then per item either
#   'f', decision id, outcome, status, token, dead-lettered (1/0)            (``finish``)
#   'c', decision id, reserve, token, rules, outcome head, outcome tail       (a cap check)
#   'r', now, sends ttl, trim_before, rule count, then per rule: is_global (1/0), exclusive
#        lower bound (now - per), max, the outcome's ``"rule":<key>`` JSON member
# A 'r' item declares the rules of the cap checks after it (``rules``: its ARGV index), once
# per batch, campaign and time. A cap check is ``_CAPS`` and, when a rule is violated,
# ``finish`` with ``head .. member .. tail``, that rule's outcome (a decision suppressed by caps
# in one step). Items run in order, each exactly as on its own; the script stops after the
# item whose check is the ``most passes``-th to pass with a reservation (a send: the shell has
# room for that many), so the rest of the batch is left as it was.
# Returns {violated rule + 1 or 0, recorded} per 'f' or 'c' item it ran.
# ``finish`` skips the deferred-claim cleanup when no claim exists (nothing else in the script
# adds one).
_SETTLE_MANY = (
    _NOW
    + """
local lease, data = KEYS[1], KEYS[2]
local claims = redis.call('EXISTS', lease) == 1
local function finish(key, did, outcome, status, token, dl, ttl, grace, now)
  local f = redis.call('HMGET', key, 't', 'e', 'dl')
  if f[1] ~= token then return 0 end
  redis.call('HSET', key, 's', 'done', 'o', outcome, 'os', status, 'l', now + grace)
  if dl == '1' then
    redis.call('HSET', key, 'dl', '1')
    if f[2] then redis.call('HDEL', key, 'e') end
  elseif f[2] or f[3] then
    redis.call('HDEL', key, 'e', 'dl')
  end
  redis.call('PEXPIRE', key, ttl)
  if claims and redis.call('ZREM', lease, did) == 1 then redis.call('HDEL', data, did) end
  return 1
end
local most, ttl, grace = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local out, a, k, passes = {}, 4, 3, 0
local n_out = 0
local bounds, maxes = {}, {}
while a <= #ARGV do
  local kind = ARGV[a]
  if kind == 'f' then
    out[n_out + 1] = 0
    out[n_out + 2] = finish(KEYS[k], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
      ARGV[a + 5], ttl, grace, now)
    n_out = n_out + 2
    a, k = a + 6, k + 1
  elseif kind == 'r' then
    local n = tonumber(ARGV[a + 4])
    local b, m = {}, {}
    for i = 0, n - 1 do
      b[i + 1] = '(' .. ARGV[a + 6 + 4 * i]
      m[i + 1] = tonumber(ARGV[a + 7 + 4 * i])
    end
    bounds[a], maxes[a] = b, m
    a = a + 5 + 4 * n
  else
    local gkey, ckey, dkey, did = KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a + 1]
    local reserve, r = ARGV[a + 2], tonumber(ARGV[a + 4])
    local n, b, m = tonumber(ARGV[r + 4]), bounds[r], maxes[r]
    local violated, recorded = 0, 0
    if not redis.call('ZSCORE', gkey, did) then
      for i = 1, n do
        local key = ckey
        if ARGV[r + 1 + 4 * i] == '1' then key = gkey end
        if redis.call('ZCOUNT', key, b[i], '+inf') >= m[i] then
          violated = i
          recorded = finish(dkey, did, ARGV[a + 5] .. ARGV[r + 4 + 4 * i] .. ARGV[a + 6],
            'suppressed', ARGV[a + 3], '0', ttl, grace, now)
          break
        end
      end
      if violated == 0 and reserve == '1' then
        -- sends older than twice the longest window are dropped when one is added (as in
        -- _CAPS, which trims first: no rule counts that far back, so no count differs)
        redis.call('ZREMRANGEBYSCORE', gkey, '-inf', '(' .. ARGV[r + 3])
        redis.call('ZREMRANGEBYSCORE', ckey, '-inf', '(' .. ARGV[r + 3])
        redis.call('ZADD', gkey, ARGV[r + 1], did)
        redis.call('ZADD', ckey, ARGV[r + 1], did)
        redis.call('PEXPIRE', gkey, ARGV[r + 2])
        redis.call('PEXPIRE', ckey, ARGV[r + 2])
      end
    end
    out[n_out + 1] = violated
    out[n_out + 2] = recorded
    n_out = n_out + 2
    a, k = a + 7, k + 3
    if violated == 0 and reserve == '1' then
      passes = passes + 1
      if passes >= most then break end
    end
  end
end
return out
"""
)

# KEYS: decision hashes. ARGV: the status of each one's published outcome.
_MARK_EMITTED_MANY = """
for i = 1, #KEYS do redis.call('HSET', KEYS[i], 'e', ARGV[i]) end
return #KEYS
"""

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

# KEYS: contact hash. ARGV: offset, profile JSON ('' = delete), its phone number ('' = none).
# ``p`` is "<offset>|<number>": ``_PREPARE_MANY`` trusts it only while ``o`` is that offset, so
# a profile written without it (by an older version, which sets ``o`` and ``v`` only) is read
# from its JSON.
_PUT_CONTACT = """
local cur = redis.call('HGET', KEYS[1], 'o')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'v', ARGV[2])
  redis.call('HDEL', KEYS[1], 'p')
else
  redis.call('HSET', KEYS[1], 'o', ARGV[1], 'v', ARGV[2], 'p', ARGV[1] .. '|' .. ARGV[3])
end
return 1
"""


# KEYS: phone hash. ARGV: status, at, source. An older keyword never overrides a newer one.
_SET_PHONE_CONSENT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'at') or '-1')
if cur > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 's', ARGV[1], 'at', ARGV[2], 'src', ARGV[3])
return 1
"""

# KEYS: the user's indexed phone. ARGV: user id, phone ('' = none), phone key prefix.
_INDEX_PHONE = """
local old = redis.call('GET', KEYS[1])
if old == ARGV[2] then return 0 end
if old then redis.call('SREM', ARGV[3] .. old .. ':users', ARGV[1]) end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('SADD', ARGV[3] .. ARGV[2] .. ':users', ARGV[1])
end
return 1
"""

# KEYS: contact hash. ARGV: expected record, new record (the offset stays), its number.
_SWAP_CONTACT = """
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2])
local o = redis.call('HGET', KEYS[1], 'o')
if o then
  redis.call('HSET', KEYS[1], 'p', o .. '|' .. ARGV[3])
else
  redis.call('HDEL', KEYS[1], 'p')
end
return 1
"""

# KEYS: link key. ARGV: record, ttl. Returns the record stored under the code.
_PUT_LINK = """
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""


@dataclasses.dataclass(frozen=True, slots=True)
class PhoneConsent:
    """Consent a handset gave by keyword (STOP/START), independent of any profile."""

    status: Consent
    at_ms: int
    source: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SentRef:
    """What a client-ref (decision id) of a sent text refers to."""

    decision_id: str
    user_id: str
    campaign_id: str
    variant: str | None
    segments: int


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_contact(raw: Any) -> Contact | None:
    return _parse_contact_record(raw)[0]


def _parse_contact_record(raw: Any) -> tuple[Contact | None, Any]:
    """The profile and the JSON it was read from (None, None when absent or unreadable)."""
    if raw is None:
        return None, None
    try:
        record = json.loads(raw)
        return Contact.from_record(record), record
    except (ContactError, ValueError):
        return None, None  # unreadable profile: treated as no contact (never texted)


def _parse_phone_consent(raw: Sequence[Any]) -> PhoneConsent | None:
    status, at = _text(raw[0]), _text(raw[1])
    if status not in ("opted_out", "opted_in") or at is None:
        return None
    return PhoneConsent(status, int(at), _text(raw[2]))  # type: ignore[arg-type]


def _apply_phone_consent(contact: Contact, state: PhoneConsent | None) -> Contact:
    if state is None or state.status != "opted_out":
        return contact
    return dataclasses.replace(
        contact, consent="opted_out", consent_at_ms=state.at_ms, consent_source=state.source
    )


_NEW = Prior("new")


def _prior(raw: Sequence[Any]) -> Prior:
    """``Prior`` from the first five fields _BEGIN returns."""
    state, outcome, emitted, wait_ms, dead_letter = raw[:5]
    if state == b"new" and not outcome:
        return _NEW  # what nearly every decision finds (a shared immutable value)
    state_s = _text(state) or "new"
    if state_s == "busy":
        return Prior("busy", wait_ms=int(wait_ms))
    parsed: SmsOutcome | None = None
    text = _text(outcome)
    if text:
        try:
            parsed = SmsOutcome.loads(text)
        except OutcomeError:
            parsed = None
    return Prior(state_s, parsed, bool(emitted), dead_letter=bool(dead_letter))  # type: ignore[arg-type]


def _outcome_json(outcome: SmsOutcome) -> bytes:
    """``outcome.dumps()`` (same fields, sorted keys, compact) at a fraction of the cost: the
    batch path stores one per cap rule of every decision."""
    return orjson.dumps(outcome.to_record(), option=orjson.OPT_SORT_KEYS)


_RULE_NULL = b'"rule":null'


def _capped_json(capped: SmsOutcome) -> tuple[bytes, bytes]:
    """``_outcome_json`` of ``capped`` split around its ``rule`` member: the script joins
    ``head``, the violated rule's ``"rule":<key>`` and ``tail``, the same bytes as
    ``_outcome_json`` of the outcome with that rule (keys are sorted; in a value, a quote is
    escaped, so the member's bytes occur once)."""
    record = capped.to_record()
    record["rule"] = None
    head, _sep, tail = orjson.dumps(record, option=orjson.OPT_SORT_KEYS).partition(_RULE_NULL)
    return head, tail


def _rule_group(rules: Sequence[CapRule], rule_keys: Sequence[str], now_ms: int) -> list[Any]:
    """A ``_SETTLE_MANY`` rule declaration ('r' item): what ``check_caps`` sends per rule, with
    each rule's ``rule`` member of the capped outcome's JSON."""
    longest = longest_window_ms(rules)
    out: list[Any] = ["r", now_ms, max(longest * 2, 60_000), now_ms - 2 * longest, len(rules)]
    for rule, key in zip(rules, rule_keys, strict=True):
        out += (
            "1" if rule.scope == GLOBAL_SCOPE else "0",
            now_ms - rule.per_ms,
            rule.max,
            b'"rule":' + orjson.dumps(key),
        )
    return out


def _settled(raw: Sequence[Any]) -> list[tuple[int | None, bool]]:
    """``settle_many``'s results from the script's flat reply."""
    out: list[tuple[int | None, bool]] = []
    for i in range(0, len(raw), 2):
        index = int(raw[i])
        out.append((None if index == 0 else index - 1, bool(raw[i + 1])))
    return out


class SentBatch:
    """A :meth:`RedisStore.send_batch` whose replies are not read yet. ``result()`` reads them
    (Redis errors, e.g. an outage, are raised there) and gives the connection back; ``discard()``
    drops the connection unread (the scripts may or may not have run: as after a lost reply)."""

    def __init__(
        self, store: RedisStore, pool: Any, conn: Any, settles: bool, prepares: bool
    ) -> None:
        self._store, self._pool, self._conn = store, pool, conn
        self._settles, self._prepares = settles, prepares

    def result(
        self,
    ) -> tuple[list[tuple[int | None, bool]], list[tuple[Prior, Prefetched]]]:
        """``(settle_many's results, prepare_many's results)``."""
        conn, self._conn = self._conn, None
        if conn is None:
            if self._settles or self._prepares:
                raise RuntimeError("this batch's replies were read or discarded already")
            return [], []
        replies: list[Any] = []
        try:
            for _ in range(self._settles + self._prepares):
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)  # read every reply before the connection is reused
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self._pool.release(conn)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        settled = _settled(replies[0]) if self._settles else []
        prepared = self._store._prepared(replies[-1]) if self._prepares else []
        return settled, prepared

    def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)


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
        self._prepare_many = client.register_script(_PREPARE_MANY)
        self._settle_many = client.register_script(_SETTLE_MANY)
        self._mark_emitted_many = client.register_script(_MARK_EMITTED_MANY)
        self._parsed_contacts: dict[
            Any, tuple[Contact | None, Any, dict[str | None, Prefetched]]
        ] = {}

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
        phone = record.get("phone") if record is not None else None
        return bool(
            self._put_contact(
                keys=[f"{self._user(user_id)}:contact"],
                args=[int(offset), value, phone if isinstance(phone, str) else ""],
            )
        )

    def contact(self, user_id: str, as_of: int | None = None) -> Contact | None:
        contact = _parse_contact(self.r.hget(f"{self._user(user_id)}:contact", "v"))
        if contact is None:
            return None
        if as_of is not None:
            contact = self._with_keyword_timeline(contact, as_of)
        return self._with_phone_consent(contact)

    def record_keyword(self, phone: str, status: str, at_ms: int) -> None:
        """Event-clock replays (``demo --inbound``): a STOP/START of ``phone`` at ``at_ms``,
        in force only for checks made at or after that time (see ``contact(as_of=...)``)."""
        if status not in ("opted_out", "opted_in"):
            raise ValueError(f"keyword consent must be opted_out or opted_in, got {status!r}")
        self.r.zadd(f"{self._phone_prefix}{phone}:timeline", {f"{at_ms}:{status}": at_ms})

    def _with_keyword_timeline(self, contact: Contact, as_of: int) -> Contact:
        """The contact with the latest STOP/START at or before ``as_of`` applied. An entry that
        :meth:`record_keyword` cannot have written is skipped (an earlier STOP still holds)."""
        key = f"{self._phone_prefix}{contact.phone}:timeline"
        for entry in self.r.zrevrangebyscore(key, as_of, "-inf", start=0, num=16):
            at, _, status = (_text(entry) or "").partition(":")
            if status in ("opted_out", "opted_in") and at.isdigit():
                return dataclasses.replace(
                    contact,
                    consent=cast(Consent, status),
                    consent_at_ms=int(at),
                    consent_source="sms:keyword",
                )
            log.warning("skipping an unreadable keyword timeline entry of a contact")
        return contact

    # -- PolicyStore ----------------------------------------------------------------------------

    def begin(self, decision: Decision, token: str, resume_deferred: bool) -> Prior:
        key = self._dkey(decision.user_id, decision.decision_id)
        raw = self._begin(
            keys=[key],
            args=[token, "1" if resume_deferred else "0", self.state_ttl_ms, self.emit_grace_ms],
        )
        return _prior(raw)

    # -- batches: the policy of many decisions in two round trips --------------------------------

    def prepare_many(self, items: Sequence[tuple[Decision, str]]) -> list[tuple[Prior, Prefetched]]:
        """``begin`` (not resuming deferred sends) for each ``(decision, token)``, with the live
        policy's reads (``contact()``, ``cancellation()``), in order, in one script call."""
        if not items:
            return []
        keys, args = self._prepare_call(items)
        return self._prepared(self._prepare_many(keys=keys, args=args))

    def _prepare_call(self, items: Sequence[tuple[Decision, str]]) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [self.state_ttl_ms, self.emit_grace_ms, self._phone_prefix]
        prefix = self.prefix
        for d, token in items:
            user = f"{prefix}{{{d.user_id}}}"
            keys += (f"{user}:d:{d.decision_id}", f"{user}:contact")
            args.append(token)
        return keys, args

    def _prepared(self, raws: Sequence[Any]) -> list[tuple[Prior, Prefetched]]:
        out = []
        parsed = self._parsed_contacts
        if len(parsed) > 4096:
            parsed.clear()  # a small memo: a batch often holds one user several times
        for at in range(0, len(raws), 11):
            raw = raws[at : at + 11]
            known = parsed.get(raw[5]) if raw[5] is not None else None
            if known is None:
                known = parsed[raw[5]] = (*_parse_contact_record(raw[5]), {})
            contact, record, reads = known
            if contact is not None and contact.consent != "opted_out":
                if isinstance(record, dict) and record.get("phone") == contact.phone:
                    state = _parse_phone_consent(raw[6:9]) if raw[6] is not None else None
                else:  # the script looked up the number as stored, not as parsed
                    state = self.phone_consent(contact.phone)
                contact = _apply_phone_consent(contact, state)
            cancellation = _text(raw[9])
            if contact is known[0]:
                # the same reads recur (the stored profile, no cancellation): one immutable value
                prefetched = reads.get(cancellation)
                if prefetched is None:
                    prefetched = reads[cancellation] = Prefetched(contact, cancellation)
            else:
                prefetched = Prefetched(contact, cancellation)
            out.append((_prior(raw), prefetched))
        return out

    def settle_many(
        self, items: Sequence[Final | CapCheck], most_passes: int | None = None
    ) -> list[tuple[int | None, bool]]:
        """Record each ``Final`` (``finish``) or check each ``CapCheck``'s caps (``check_caps``;
        a violation records that rule's outcome at once), in order, in one script call.

        Returns ``(violated rule or None, recorded)`` per item (``(None, recorded)`` for a Final).
        Each item is exactly as on its own; the order makes one user's decisions see each other's
        reservations exactly as one at a time would. With ``most_passes``, the script stops after
        the item whose check is the ``most_passes``-th to pass with a reservation (a text to
        send): only the results of the items it ran are returned, the others are untouched."""
        if not items:
            return []
        keys, args = self._settle_call(items, most_passes)
        return _settled(self._settle_many(keys=keys, args=args))

    def send_batch(
        self,
        settle: Sequence[Final | CapCheck],
        most_passes: int | None,
        prepare: Sequence[tuple[Decision, str]],
    ) -> SentBatch:
        """``settle_many(settle, most_passes)``, then ``prepare_many(prepare)``: both written to
        Redis now, in that order, on one connection; their results are read by
        :meth:`SentBatch.result`. Redis runs the scripts while the caller does other work (the
        dispatcher publishes the previous batch meanwhile), without a second thread."""
        commands: list[tuple[Any, ...]] = []
        if settle:
            keys, args = self._settle_call(settle, most_passes)
            commands.append(("EVAL", _SETTLE_MANY, len(keys), *keys, *args))
        if prepare:
            keys, args = self._prepare_call(prepare)
            commands.append(("EVAL", _PREPARE_MANY, len(keys), *keys, *args))
        pool = self.r.connection_pool
        conn = pool.get_connection() if commands else None
        try:
            if conn is not None:
                # hiredis packs str/bytes/int arguments as they are; redis-py's packer first
                # looks at each of the batch's thousands of arguments in Python
                packed = (
                    [b"".join(_pack_command(c) for c in commands)]
                    if _pack_command is not None
                    else conn.pack_commands(commands)
                )
                conn.send_packed_command(packed)
        except BaseException:
            assert conn is not None
            conn.disconnect()
            pool.release(conn)
            raise
        return SentBatch(self, pool, conn, bool(settle), bool(prepare))

    def _settle_call(
        self, items: Sequence[Final | CapCheck], most_passes: int | None
    ) -> tuple[list[str], list[Any]]:
        _deferred, data, lease = self._deferred
        keys: list[str] = [lease, data]
        most = len(items) + 1 if most_passes is None else max(1, most_passes)
        args: list[Any] = [most, self.state_ttl_ms, self.emit_grace_ms]
        prefix = self.prefix
        # (rules, their keys, now) -> ARGV index (1-based) of their 'r' item; the items hold
        # the rules, so the ids stay valid throughout
        groups: dict[tuple[int, int, int], int] = {}
        for item in items:
            d = item.decision
            user = f"{prefix}{{{d.user_id}}}"
            dkey = f"{user}:d:{d.decision_id}"
            if isinstance(item, Final):
                keys.append(dkey)
                args += (
                    "f",
                    d.decision_id,
                    _outcome_json(item.outcome),
                    item.outcome.status,
                    item.token,
                    "1" if item.dead_letter else "0",
                )
                continue
            now_ms = item.now_ms
            group_key = (id(item.rules), id(item.rule_keys), now_ms)
            group = groups.get(group_key)
            if group is None:
                group = groups[group_key] = len(args) + 1
                args += _rule_group(item.rules, item.rule_keys, now_ms)
            head, tail = _capped_json(item.capped)
            keys += (f"{user}:sends", f"{user}:sends:{d.campaign_id}", dkey)
            args += (
                "c",
                d.decision_id,
                "1" if item.reserve else "0",
                item.token,
                group,
                head,
                tail,
            )
        return keys, args

    def cancellation(self, decision: Decision, as_of: int | None = None) -> str | None:
        reason, at = self.r.hmget(self._dkey(decision.user_id, decision.decision_id), "c", "ca")
        if reason is None or (as_of is not None and at is not None and int(at) > as_of):
            return None  # event clock: that conversion happens later than this check
        return _text(reason)

    def cancel(
        self, cancel: DecisionCancelled, outcome: SmsOutcome, event_clock: bool = False
    ) -> bool:
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
                    cancel.at,
                    "1" if event_clock else "0",
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

    def start_call(self, decision: Decision, token: str, as_of: int | None = None) -> CallPermit:
        key = self._dkey(decision.user_id, decision.decision_id)
        contact = f"{self._user(decision.user_id)}:contact"
        args: list[str | int] = [
            token,
            self.call_lease_ms,
            self._phone_prefix,
            -1 if as_of is None else as_of,
        ]
        return _text(self._start(keys=[key, contact], args=args)) or "lost"

    def extend_call(self, decision: Decision, token: str) -> bool:
        """Renew the ``calling`` lease before a retry, so no other instance takes it as a crash."""
        key = self._dkey(decision.user_id, decision.decision_id)
        return bool(self._extend(keys=[key], args=[token, self.call_lease_ms]))

    def finish(
        self,
        decision: Decision,
        outcome: SmsOutcome,
        sent: bool,
        token: str,
        dead_letter: bool = False,
    ) -> bool:
        _deferred, data, lease = self._deferred
        return bool(
            self._finish(
                keys=[self._dkey(decision.user_id, decision.decision_id), lease, data],
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
        self.r.hset(self._dkey(decision.user_id, decision.decision_id), "e", status)

    def mark_emitted_many(self, items: Sequence[tuple[str, str, str]]) -> None:
        """``(user_id, decision_id, status)`` for each published outcome, in one script call."""
        if not items:
            return
        keys = [self._dkey(user_id, decision_id) for user_id, decision_id, _status in items]
        self._mark_emitted_many(keys=keys, args=[status for _u, _d, status in items])

    # -- webhooks: handset consent, phone index, sent texts, short links ------------------------

    @property
    def _phone_prefix(self) -> str:
        return f"{self.prefix}phone:"

    @cached_property
    def _set_phone_consent(self) -> Any:
        return self.r.register_script(_SET_PHONE_CONSENT)

    @cached_property
    def _index_phone(self) -> Any:
        return self.r.register_script(_INDEX_PHONE)

    @cached_property
    def _swap_contact(self) -> Any:
        return self.r.register_script(_SWAP_CONTACT)

    @cached_property
    def _put_link(self) -> Any:
        return self.r.register_script(_PUT_LINK)

    def _with_phone_consent(self, contact: Contact) -> Contact:
        """The profile as the policy must see it: a STOP from its number overrides it."""
        if contact.consent == "opted_out":
            return contact
        return _apply_phone_consent(contact, self.phone_consent(contact.phone))

    def phone_consent(self, phone: str) -> PhoneConsent | None:
        """The last keyword consent (STOP/START) received from ``phone`` (E.164), if any."""
        return _parse_phone_consent(self.r.hmget(self._phone_prefix + phone, ["s", "at", "src"]))

    def set_phone_consent(self, phone: str, status: Consent, at_ms: int, source: str) -> bool:
        """Record a keyword consent of ``phone``; False when a newer one is already recorded.

        In force for the dispatcher as soon as this returns (``contact`` and ``start_call``).
        """
        if status not in ("opted_out", "opted_in"):
            raise ValueError(f"handset consent must be opted_out or opted_in, got {status!r}")
        keys = [self._phone_prefix + phone]
        return bool(self._set_phone_consent(keys=keys, args=[status, int(at_ms), source]))

    def set_consent(
        self, user_id: str, status: Consent, at_ms: int, source: str, phone: str | None = None
    ) -> Contact | None:
        """Set the consent of the stored profile of ``user_id`` in place; the updated profile.

        None when there is no readable profile, its number is not ``phone`` (when given), or
        its consent is newer than ``at_ms``. The caller publishes the result to the contacts
        topic (whose record then replaces this one).
        """
        key = f"{self._user(user_id)}:contact"
        for _ in range(16):  # compare-and-swap; retried only under concurrent writes
            raw = self.r.hget(key, "v")
            if raw is None:
                return None
            try:
                contact = Contact.from_record(json.loads(raw))
            except (ContactError, ValueError):
                return None
            if phone is not None and contact.phone != phone:
                return None
            if contact.consent_at_ms is not None and contact.consent_at_ms > at_ms:
                return None
            updated = dataclasses.replace(
                contact, consent=status, consent_at_ms=int(at_ms), consent_source=source
            )
            new = json.dumps(updated.to_record(), separators=(",", ":"))
            if self._swap_contact(keys=[key], args=[raw, new, updated.phone]):
                return updated
        raise RuntimeError("contact record kept changing; consent not set")

    def index_phone(self, user_id: str, phone: str | None) -> None:
        """Keep the phone -> users index current (``None``: the profile was deleted)."""
        key = f"{self._user(user_id)}:phone"
        self._index_phone(keys=[key], args=[user_id, phone or "", self._phone_prefix])

    def users_for_phone(self, phone: str) -> list[str]:
        """Ids of the profiles with this number, sorted."""
        members = self.r.smembers(f"{self._phone_prefix}{phone}:users")
        return sorted(_text(m) or "" for m in members)  # type: ignore[union-attr]

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
        pipe.set(f"{self._user(decision.user_id)}:last", decision.campaign_id, px=self.state_ttl_ms)
        pipe.execute()

    def sent_ref(self, decision_id: str) -> SentRef | None:
        raw = self.r.hgetall(f"{self.prefix}sent:{decision_id}")
        if not raw:
            return None
        f = {_text(k): _text(v) for k, v in raw.items()}  # type: ignore[union-attr]
        user, campaign, segments = f.get("u"), f.get("c"), f.get("n")
        if not user or not campaign or not segments or not segments.isdigit():
            return None
        return SentRef(decision_id, user, campaign, f.get("v") or None, int(segments))

    def last_campaign(self, user_id: str) -> str | None:
        """Campaign of the last text sent to ``user_id`` (within the state TTL)."""
        return _text(self.r.get(f"{self._user(user_id)}:last"))

    def put_link(self, code: str, record: Mapping[str, str], ttl_ms: int) -> dict[str, str]:
        """Store a short link unless ``code`` is taken; returns the record under ``code``."""
        value = json.dumps(dict(record), separators=(",", ":"), sort_keys=True)
        stored = self._put_link(keys=[f"{self.prefix}link:{code}"], args=[value, int(ttl_ms)])
        return dict(json.loads(_text(stored) or "{}"))

    def link(self, code: str) -> dict[str, str] | None:
        raw = self.r.get(f"{self.prefix}link:{code}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None
