"""Everything NudgeFlow keeps in Redis: the policy's store, contacts, sent texts and links, and
the gateway rate limit; the Lua scripts are ``scripts/*.lua`` (:mod:`processors.redis.scripts`).

``RedisStore`` is the ``PolicyStore`` shared by every dispatcher instance.

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
  On a Redis Cluster the same three keys per shard, ``P{deferred:<k>}``, ``...:data``,
  ``...:lease`` (``k`` = CRC32 of the decision id modulo ``DEFERRED_SHARDS``).

Written by the webhook service (:mod:`processors.webhooks`), read by the dispatcher:

* ``Pphone:<e164>`` hash: ``s`` consent the handset gave by keyword (opted_out|opted_in), ``at``
  its time, ``src`` the keyword. A STOP here overrides every profile of that number (also ones
  imported later) until a START from the same number: ``RedisStore.contact`` and the last
  check before the gateway call both read it. Kept without expiry.
* ``Pphone:<e164>:users`` set of user ids with that number, ``P{u}:phone`` the indexed number.
* ``Psent:<decision_id>`` hash (``u`` user, ``c`` campaign, ``v`` variant, ``n`` segments): what a
  delivery receipt's client-ref refers to; ``P{u}:last`` the campaign of the user's last text.
* ``Plink:<code>`` JSON of a short link's target (expires after the link TTL).

Single Redis or Redis Cluster (:mod:`processors.redis.client`, ``redis+cluster://`` URLs): on a
cluster every script call touches one slot. The batch scripts (``prepare_many``, ``settle_many``,
``mark_emitted_many``) run once per slot instead of once per batch; an operation on a decision
and on the deferred index (defer, cancel, claim, finish of a claim) is two one-slot steps in an
order a crash cannot turn into a lost or doubled send; a number's keyword consent is read outside
the user's script. ``docs/guarantees.md`` ("On a Redis Cluster") says what each costs.
"""

from __future__ import annotations

from processors.redis.base import DEFAULT_PREFIX, EMIT_GRACE_MS, LEASE_MS, STATE_TTL_MS
from processors.redis.batches import SentBatch
from processors.redis.contacts import PhoneConsent
from processors.redis.sent import SentRef
from processors.redis.store import RedisStore

__all__ = [
    "DEFAULT_PREFIX",
    "EMIT_GRACE_MS",
    "LEASE_MS",
    "STATE_TTL_MS",
    "PhoneConsent",
    "RedisStore",
    "SentBatch",
    "SentRef",
]
