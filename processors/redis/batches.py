"""The live dispatcher's batches: the policy of many decisions in two script calls.

``prepare_many`` reserves each decision and reads what the policy needs; ``settle_many`` records
the final outcomes and runs the cap checks, in order. On a single Redis each is one call for the
keys of many users; on a Redis Cluster, one call per slot (pipelined: one round trip per node),
each decision's part exactly as on its own, one user's decisions in their order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis

from processors.core.cap import GLOBAL_SCOPE, CapRule, longest_window_ms
from processors.core.contact import Contact
from processors.core.decision import Decision
from processors.core.outcome import SmsOutcome
from processors.core.policy import CapCheck, Final, Prefetched, Prior
from processors.redis import scripts
from processors.redis.base import DEFAULT_PREFIX, Call, text
from processors.redis.client import Client
from processors.redis.contacts import (
    ContactRecords,
    PhoneConsent,
    apply_phone_consent,
    parse_contact_record,
    parse_phone_consent,
)
from processors.redis.decisions import DecisionRecords, prior_of

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # redis-py without hiredis: its own packer
    _pack_command = None


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
    """A ``settle_many.lua`` rule declaration ('r' item): what ``check_caps`` sends per rule, with
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
        self,
        store: Batches,
        pool: Any,
        conn: Any,
        settles: bool,
        prepares: bool,
        done: tuple[list[tuple[int | None, bool]], list[tuple[Prior, Prefetched]]]
        | BaseException
        | None = None,
    ) -> None:
        self._store, self._pool, self._conn = store, pool, conn
        self._settles, self._prepares = settles, prepares
        self._done = done  # a cluster's batch, run at once (its results or its error)

    @classmethod
    def ran(
        cls,
        store: Batches,
        done: tuple[list[tuple[int | None, bool]], list[tuple[Prior, Prefetched]]] | Exception,
    ) -> SentBatch:
        """A batch that ran already (a Redis Cluster's: several calls per phase); its results,
        or the Redis error that ``result()`` raises."""
        return cls(store, None, None, True, True, done)

    def result(
        self,
    ) -> tuple[list[tuple[int | None, bool]], list[tuple[Prior, Prefetched]]]:
        """``(settle_many's results, prepare_many's results)``."""
        conn, self._conn = self._conn, None
        if self._done is not None:
            done, self._done = self._done, None
            if isinstance(done, BaseException):
                raise done
            return done
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
        prepared = self._store.prepared(replies[-1]) if self._prepares else []
        return settled, prepared

    def discard(self) -> None:
        conn, self._conn = self._conn, None
        self._done = None
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)


class Batches(DecisionRecords, ContactRecords):
    """Batch forms of ``begin`` + reads and of ``finish`` + ``check_caps`` (exactly as one at a
    time, in order)."""

    def __init__(self, client: Client, prefix: str = DEFAULT_PREFIX, **kw: Any) -> None:
        super().__init__(client, prefix, **kw)
        # a small memo of parsed profiles: a batch often holds one user several times
        self._parsed_contacts: dict[
            Any, tuple[Contact | None, Any, dict[str | None, Prefetched]]
        ] = {}

    def prepare_many(
        self, items: Sequence[tuple[Decision, str]], as_of: int | None = None
    ) -> list[tuple[Prior, Prefetched]]:
        """``begin`` (not resuming deferred sends) for each ``(decision, token)``, with the
        policy's reads (``contact(as_of)``, ``cancellation(as_of)``), in order, in one script
        call (with ``as_of``, event-clock replays: one more read for the keyword timeline)."""
        if not items:
            return []
        if self.cluster:
            return self.prepared(self._prepare_grouped(items), as_of)
        keys, args = self._prepare_call(items)
        return self.prepared(self._script("prepare_many")(keys=keys, args=args), as_of)

    def _prepare_grouped(self, items: Sequence[tuple[Decision, str]]) -> list[Any]:
        """Cluster: ``prepare_many.lua`` once per slot; the flat reply in the order of
        ``items``."""
        users = [self.user_key(d.user_id) for d, _token in items]
        groups = self.slot_groups(users)
        replies = self.run_calls(
            "prepare_many", [self._prepare_call([items[i] for i in g]) for g in groups]
        )
        flat: list[Any] = [None] * (11 * len(items))
        for group, reply in zip(groups, replies, strict=True):
            for j, i in enumerate(group):
                flat[11 * i : 11 * i + 11] = reply[11 * j : 11 * j + 11]
        return flat

    def _prepare_call(self, items: Sequence[tuple[Decision, str]]) -> Call:
        keys: list[str] = []
        phones = "" if self.cluster else self.phone_prefix  # cluster: read by ``prepared``
        args: list[Any] = [self.state_ttl_ms, self.emit_grace_ms, phones]
        prefix = self.prefix
        for d, token in items:
            user = f"{prefix}{{{d.user_id}}}"
            keys += (f"{user}:d:{d.decision_id}", f"{user}:contact")
            args.append(token)
        return keys, args

    def prepared(
        self, raws: Sequence[Any], as_of: int | None = None
    ) -> list[tuple[Prior, Prefetched]]:
        """The replies of the ``prepare_many`` script, as ``prepare_many`` returns them."""
        out = []
        parsed = self._parsed_contacts
        if len(parsed) > 4096:
            parsed.clear()  # a small memo: a batch often holds one user several times
        # a cluster's script reads no keyword consent (another slot): read them all at once
        phones = self._phone_consents_of(raws) if self.cluster else None
        for at in range(0, len(raws), 11):
            raw = raws[at : at + 11]
            known = parsed.get(raw[5]) if raw[5] is not None else None
            if known is None:
                known = parsed[raw[5]] = (*parse_contact_record(raw[5]), {})
            contact, record, reads = known
            if contact is not None and as_of is not None:
                contact = self.with_keyword_timeline(contact, as_of)
            if contact is not None and contact.consent != "opted_out":
                if phones is not None:
                    state = phones.get(contact.phone)
                elif isinstance(record, dict) and record.get("phone") == contact.phone:
                    state = parse_phone_consent(raw[6:9]) if raw[6] is not None else None
                else:  # the script looked up the number as stored, not as parsed
                    state = self.phone_consent(contact.phone)
                contact = apply_phone_consent(contact, state)
            cancellation = text(raw[9])
            if as_of is not None and raw[10] is not None and int(raw[10]) > as_of:
                cancellation = None  # that conversion happens later than this check
            if contact is known[0]:
                # the same reads recur (the stored profile, no cancellation): one immutable value
                prefetched = reads.get(cancellation)
                if prefetched is None:
                    prefetched = reads[cancellation] = Prefetched(contact, cancellation)
            else:
                prefetched = Prefetched(contact, cancellation)
            out.append((prior_of(raw), prefetched))
        return out

    def _phone_consents_of(self, raws: Sequence[Any]) -> dict[str, PhoneConsent | None]:
        """The keyword consent of the number of every profile in ``prepare_many``'s replies."""
        parsed = self._parsed_contacts
        numbers: set[str] = set()
        for at in range(5, len(raws), 11):
            known = parsed.get(raws[at]) if raws[at] is not None else None
            if known is None:
                known = parsed[raws[at]] = (*parse_contact_record(raws[at]), {})
            if known[0] is not None:
                numbers.add(known[0].phone)
        return self.phone_consents(sorted(numbers)) if numbers else {}

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
        if self.cluster:
            return self._settle_grouped(items, most_passes)
        keys, args = self._settle_call(items, most_passes)
        return _settled(self._script("settle_many")(keys=keys, args=args))

    def _settle_grouped(
        self, items: Sequence[Final | CapCheck], most_passes: int | None
    ) -> list[tuple[int | None, bool]]:
        """Cluster: ``settle_many.lua`` once per slot, over prefixes of ``items`` that cannot
        hold more than the passes still allowed; stops once ``most_passes`` passed. The items
        it ran are a prefix of ``items`` that may reach past the last pass (items that send
        nothing: a Final, a violated check)."""
        budget = None if most_passes is None else max(1, most_passes)
        out: list[tuple[int | None, bool]] = []
        start = 0
        while start < len(items) and budget != 0:
            end, possible = start, 0
            while end < len(items):
                item = items[end]
                if budget is not None and isinstance(item, CapCheck) and item.reserve:
                    if possible == budget:
                        break
                    possible += 1
                end += 1
            chunk = items[start:end]
            users = [self.user_key(item.decision.user_id) for item in chunk]
            groups = self.slot_groups(users)
            calls = [self._settle_call([chunk[i] for i in g], None) for g in groups]
            results: list[tuple[int | None, bool]] = [(None, False)] * len(chunk)
            for group, reply in zip(groups, self.run_calls("settle_many", calls), strict=True):
                for i, result in zip(group, _settled(reply), strict=True):
                    results[i] = result
            out += results
            self._release_claims(
                item.decision.decision_id
                for item, (_violated, recorded) in zip(chunk, results, strict=True)
                if recorded
            )
            if budget is not None:
                budget -= sum(
                    1
                    for item, (violated, _recorded) in zip(chunk, results, strict=True)
                    if isinstance(item, CapCheck) and item.reserve and violated is None
                )
            start = end
        return out

    def send_batch(
        self,
        settle: Sequence[Final | CapCheck],
        most_passes: int | None,
        prepare: Sequence[tuple[Decision, str]],
    ) -> SentBatch:
        """``settle_many(settle, most_passes)``, then ``prepare_many(prepare)``: both written to
        Redis now, in that order, on one connection; their results are read by
        :meth:`SentBatch.result`. Redis runs the scripts while the caller does other work (the
        dispatcher publishes the previous batch meanwhile), without a second thread. On a Redis
        Cluster both run now, one after the other (several calls each, pipelined per node)."""
        if self.cluster:
            try:
                settled = self.settle_many(settle, most_passes)
                return SentBatch.ran(self, (settled, self.prepare_many(prepare)))
            except redis.RedisError as exc:  # raised by result(), as on a single Redis
                return SentBatch.ran(self, exc)
        commands: list[tuple[Any, ...]] = []
        if settle:
            keys, args = self._settle_call(settle, most_passes)
            commands.append(("EVAL", scripts.source("settle_many"), len(keys), *keys, *args))
        if prepare:
            keys, args = self._prepare_call(prepare)
            commands.append(("EVAL", scripts.source("prepare_many"), len(keys), *keys, *args))
        assert isinstance(self.r, redis.Redis)
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

    def _settle_call(self, items: Sequence[Final | CapCheck], most_passes: int | None) -> Call:
        keys: list[str] = []
        if not self.cluster:  # a cluster's index is in other slots (see _settle_grouped)
            _deferred, data, lease = self.deferred_keys
            keys += (lease, data)
        most = len(items) + 1 if most_passes is None else max(1, most_passes)
        args: list[Any] = [
            most,
            self.state_ttl_ms,
            self.emit_grace_ms,
            "0" if self.cluster else "1",
        ]
        prefix = self.prefix
        # (rules, their keys, now) -> ARGV index (1-based) of their 'r' item; the items hold
        # the rules, so the ids stay valid throughout
        groups: dict[tuple[int, int, int], int] = {}
        for item in items:
            d = item.decision
            user = f"{prefix}{{{d.user_id}}}"
            dkey = f"{user}:d:{d.decision_id}"
            if isinstance(item, Final):
                if item.release:
                    raise ValueError("settle_many records outcomes only (no cap release)")
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
