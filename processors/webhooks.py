"""``nudgeflow webhooks``: what comes back from handsets and the gateway, into Kafka and Redis.

An aiohttp service with five routes (``docs/webhooks.openapi.yaml``):

* ``GET|POST /webhooks/vonage/delivery`` — Vonage delivery receipts. The client-ref is our
  decision id; the dispatcher records what it refers to right before the gateway call
  (:meth:`RedisStore.remember_send`). The receipts of a multipart text are folded into one state
  (:mod:`processors.core.receipts`) and published as ``DeliveryReceipt`` on ``sms-delivery``.
* ``GET|POST /webhooks/vonage/inbound`` — inbound texts. STOP-class keywords opt the number out
  in Redis *before* the answer (the dispatcher's consent check and its last check before every
  gateway call read it), update every profile with that number on ``contacts`` and send one
  confirmation; HELP-class get the help text; START-class opt back in with a confirmation;
  anything else goes to ``sms-inbound`` as ``InboundSms``.
* ``GET /l/{code}`` — tracked short links (created by the dispatcher, :mod:`processors.core.links`):
  302 to the target and a ``sms_link_click`` ``ClickEvent`` on the clickstream, keyed by user.
* ``GET /healthz`` (200 once the contacts topic is read to its end), ``GET /metrics``.

Request rules: bodies over ``webhook_max_body_bytes`` -> 413; unparseable or incomplete -> 400
(415 for a content type other than form or JSON); with a signature secret configured, a missing
or wrong ``sig`` or a ``timestamp`` off by more than the tolerance -> 401 and nothing changes.
Valid requests get 200 as soon as their effects are durable (Redis written, Kafka acknowledged);
confirmations are sent after the answer. Retries are idempotent: every receipt (message id +
status) and inbound message (message id) is claimed in Redis and marked done only after its
effects; a failure releases the claim and answers 503, so Vonage's retry does the work again.

Unknown numbers: a STOP from a number no profile has is still recorded by phone
(``Pphone:<e164>``), and it overrides every profile that later arrives with that number, e.g.
from a contacts import, until the number texts START. Only the handset lifts its own STOP.

Concatenated inbound texts: the keyword is read from part 1; parts 2+ always go to
``sms-inbound`` (with their ``concat_*`` fields) for the user's tools to reassemble.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

import redis
from aiohttp import web
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CONTENT_TYPE_LATEST

from processors import arguments, metrics
from processors.core import receipts
from processors.core.contact import Contact
from processors.core.events import MAX_VALUE_LEN, ClickEvent, EventError, validate
from processors.core.keywords import KeywordKind, classify, first_word
from processors.core.links import CLICK_EVENT_TYPE, LinkError, LinkTarget, is_valid_code
from processors.core.policy import RetryPolicy
from processors.core.rendering import measure
from processors.gateways.base import Gateway, GatewayError, RetryableGatewayError, SmsMessage
from processors.redis import DEFAULT_PREFIX, RedisStore
from processors.redis.rate_limit import RateLimiter
from processors.settings import Settings
from schemas.codec import Codec, CodecError

log = logging.getLogger("nudgeflow.webhooks")

DELIVERY_PATH: Final = "/webhooks/vonage/delivery"
INBOUND_PATH: Final = "/webhooks/vonage/inbound"
CLAIM_LEASE_MS: Final = 30_000
"""How long a webhook being processed blocks a concurrent duplicate (a crash frees it then)."""
PUBLISH_TIMEOUT_S: Final = 10.0
CLICK_PUBLISH_TIMEOUT_S: Final = 2.0
KEYWORD_CAMPAIGN: Final = "keyword-reply"
MAX_FIELDS: Final = 100
SIGNATURE_METHODS: Final = ("md5hash", "md5", "sha1", "sha256", "sha512")

_MSISDN = re.compile(r"^\+?([1-9][0-9]{6,14})$")
_DIGITS = re.compile(r"^[0-9]+$")  # ASCII only: str.isdigit() also accepts "²" and "١"


# --------------------------------------------------------------------------- errors


class WebhookError(Exception):
    """A request we refuse: ``status`` is the HTTP answer, ``reason`` a log-safe token."""

    def __init__(self, status: int, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason


class SignatureError(WebhookError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(401, reason, detail)


# --------------------------------------------------------------------------- signatures


def _signing_string(params: Mapping[str, str]) -> str:
    """``&k=v`` for every param but ``sig``, sorted by key; ``&`` and ``=`` in values become
    ``_`` (Vonage's canonical form)."""
    out = []
    for key in sorted(k for k in params if k != "sig"):
        value = str(params[key]).replace("&", "_").replace("=", "_")
        out.append(f"&{key}={value}")
    return "".join(out)


def _md5hash(params: Mapping[str, str], secret: str) -> str:
    """Vonage's legacy "MD5 hash" signature: MD5 of the canonical string plus the secret."""
    return hashlib.md5((_signing_string(params) + secret).encode()).hexdigest()


def sign_params(params: Mapping[str, str], secret: str, method: str = "sha256") -> dict[str, str]:
    """``params`` plus ``timestamp`` (if absent), ``nonce`` (if absent) and ``sig`` as Vonage
    signs a webhook; for tests and for replaying captured webhooks."""
    signed = {**params}
    signed.setdefault("timestamp", str(int(time.time())))
    signed.setdefault("nonce", str(uuid.uuid4()))
    signed.pop("sig", None)
    if method == "md5hash":
        signed["sig"] = _md5hash(signed, secret)
    else:
        from vonage import Auth

        auth = Auth(api_key="nudgeflow", signature_secret=secret, signature_method=method)
        signed["sig"] = auth.sign_params(dict(signed))
    return signed


class SignatureVerifier:
    """Checks Vonage webhook signatures: HMAC-MD5/SHA1/SHA256/SHA512 through the vonage SDK's
    ``Auth.check_signature``, and the legacy MD5 hash; plus the timestamp's freshness."""

    def __init__(self, secret: str, method: str = "sha256", tolerance_s: float = 300.0) -> None:
        if not secret:
            raise ValueError("signature secret must not be empty")
        if method not in SIGNATURE_METHODS:
            raise ValueError(f"signature method must be one of {', '.join(SIGNATURE_METHODS)}")
        self.secret = secret
        self.method = method
        self.tolerance_s = tolerance_s
        self._auth: Any = None
        if method != "md5hash":
            from vonage import Auth

            self._auth = Auth(api_key="nudgeflow", signature_secret=secret, signature_method=method)

    def verify(self, params: Mapping[str, str], now_s: float) -> None:
        """Raise :class:`SignatureError` unless ``params`` are signed and fresh."""
        sig = params.get("sig")
        if not sig:
            raise SignatureError("missing_signature", "the request is not signed")
        raw_ts = params.get("timestamp")
        if not raw_ts:
            raise SignatureError("missing_timestamp", "a signed request needs a timestamp")
        if not _DIGITS.match(raw_ts) or len(raw_ts) > 12:
            raise SignatureError("bad_timestamp", "timestamp must be unix seconds")
        if abs(now_s - int(raw_ts)) > self.tolerance_s:
            raise SignatureError("stale", "timestamp is outside the accepted window")
        if self.method == "md5hash":
            ok = hmac.compare_digest(sig.lower(), _md5hash(params, self.secret))
        else:
            ok = bool(self._auth.check_signature(dict(params)))
        if not ok:
            raise SignatureError("bad_signature", "the signature does not match")


# --------------------------------------------------------------------------- request parsing


async def read_params(request: web.Request, max_bytes: int) -> dict[str, str]:
    """The webhook's parameters: the query for GET, the form or JSON body for POST."""
    if request.method in ("GET", "HEAD"):
        if len(request.query_string) > max_bytes:
            raise WebhookError(413, "too_large", f"query is over {max_bytes} bytes")
        return _unique(parse_qsl(request.query_string, keep_blank_values=True))
    if request.content_length is not None and request.content_length > max_bytes:
        raise WebhookError(413, "too_large", f"body is over {max_bytes} bytes")
    body = await request.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise WebhookError(413, "too_large", f"body is over {max_bytes} bytes")
    ctype = request.content_type.lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return _json_params(body)
    if ctype in ("application/x-www-form-urlencoded", "application/octet-stream", ""):
        try:
            text = body.decode("utf-8")
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except (UnicodeDecodeError, ValueError):
            raise WebhookError(400, "malformed", "body is not a UTF-8 form") from None
        return _unique(pairs)
    raise WebhookError(415, "unsupported_media_type", "send a form or a JSON object")


def _unique(pairs: list[tuple[str, str]]) -> dict[str, str]:
    if len(pairs) > MAX_FIELDS:
        raise WebhookError(400, "malformed", f"more than {MAX_FIELDS} parameters")
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise WebhookError(400, "malformed", "a parameter is repeated")
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates ("\ud800" in JSON) cannot be stored
            raise WebhookError(400, "malformed", "parameters must be valid Unicode") from None
        out[key] = value
    return out


def _json_params(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise WebhookError(400, "malformed", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise WebhookError(400, "malformed", "body must be a JSON object")
    if len(data) > MAX_FIELDS:
        raise WebhookError(400, "malformed", f"more than {MAX_FIELDS} parameters")
    pairs: list[tuple[str, str]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            pairs.append((key, "true" if value else "false"))
        elif isinstance(value, int | float | str):
            pairs.append((key, str(value)))
        else:
            raise WebhookError(400, "malformed", "parameters must be strings or numbers")
    return _unique(pairs)


def _required(params: Mapping[str, str], name: str, max_len: int = 256) -> str:
    value = params.get(name, "").strip()
    if not value:
        raise WebhookError(400, f"missing_{name}", f"{name} is required")
    if len(value) > max_len:
        raise WebhookError(400, f"bad_{name}", f"{name} is longer than {max_len} characters")
    return value


def _optional(params: Mapping[str, str], name: str, max_len: int = 256) -> str | None:
    value = params.get(name, "").strip()
    if len(value) > max_len:
        raise WebhookError(400, f"bad_{name}", f"{name} is longer than {max_len} characters")
    return value or None


def normalize_msisdn(raw: str) -> str:
    """Vonage's ``447700900001`` (or ``+447700900001``) as E.164 with a ``+``."""
    match = _MSISDN.match(raw.strip())
    if not match:
        raise WebhookError(400, "bad_msisdn", "msisdn must be an international number")
    return "+" + match.group(1)


def _int_or_none(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if not _DIGITS.match(value) or len(value) > 6:
        raise WebhookError(400, f"bad_{name}", f"{name} must be a small positive integer")
    return int(value)


def _timestamp(params: Mapping[str, str], name: str) -> int | None:
    try:
        return receipts.parse_message_timestamp(params.get(name))
    except receipts.ReceiptError as exc:
        raise WebhookError(400, f"bad_{name}", str(exc)) from None


@dataclass(frozen=True, slots=True)
class Receipt:
    """One Vonage delivery receipt (of one part)."""

    message_id: str
    status: str  # normalized
    client_ref: str | None
    err_code: str | None
    price: str | None
    network_code: str | None
    carrier_at: int | None

    def part_record(self) -> str:
        return json.dumps(
            {"s": self.status, "e": self.err_code, "p": self.price, "t": self.carrier_at},
            separators=(",", ":"),
        )


def parse_receipt(params: Mapping[str, str]) -> Receipt:
    """Validate a delivery receipt's fields (raises ``WebhookError(400)``)."""
    message_id = _required(params, "messageId", 64)
    try:
        status = receipts.normalize_status(params.get("status"))
        carrier_at = receipts.parse_scts(params.get("scts"))
    except receipts.ReceiptError as exc:
        raise WebhookError(400, "bad_receipt", str(exc)) from None
    raw_msisdn = params.get("msisdn")
    if raw_msisdn:
        normalize_msisdn(raw_msisdn)  # shape check only: matching goes by client-ref
    price = _optional(params, "price", 32)
    if price is not None and receipts.sum_prices([price]) is None:
        raise WebhookError(400, "bad_price", "price must be a decimal number")
    _timestamp(params, "message-timestamp")
    return Receipt(
        message_id=message_id,
        status=status,
        client_ref=_optional(params, "client-ref", 100),
        err_code=_optional(params, "err-code", 16),
        price=price,
        network_code=_optional(params, "network-code", 16),
        carrier_at=carrier_at,
    )


@dataclass(frozen=True, slots=True)
class Inbound:
    """One inbound text (or one part of a concatenated one)."""

    message_id: str
    phone: str  # E.164 with +
    to: str
    text: str
    type: str
    keyword: str | None
    message_timestamp: int | None
    concat_ref: str | None
    concat_total: int | None
    concat_part: int | None

    @property
    def keyword_part(self) -> bool:
        """Whether this part carries the first word (single texts and part 1)."""
        return self.concat_part is None or self.concat_part == 1

    def to_record(self, user_id: str | None, received_at: int) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "user_id": user_id,
            "msisdn": self.phone,
            "to": self.to,
            "text": self.text,
            "type": self.type,
            "keyword": self.keyword,
            "message_timestamp": self.message_timestamp,
            "received_at": received_at,
            "concat_ref": self.concat_ref,
            "concat_total": self.concat_total,
            "concat_part": self.concat_part,
        }


def parse_inbound(params: Mapping[str, str]) -> Inbound:
    """Validate an inbound SMS's fields (raises ``WebhookError(400)``)."""
    message_id = _required(params, "messageId", 64)
    phone = normalize_msisdn(_required(params, "msisdn", 32))
    to = _required(params, "to", 32)
    kind = (params.get("type") or "text").strip().lower()
    if kind not in ("text", "unicode", "binary"):
        raise WebhookError(400, "bad_type", "type must be text, unicode or binary")
    text = params.get("text", "")
    if kind != "binary" and "text" not in params:
        raise WebhookError(400, "missing_text", "text is required")
    if len(text) > 2_000:
        raise WebhookError(400, "bad_text", "text is longer than 2000 characters")
    part = _int_or_none(params, "concat-part")
    total = _int_or_none(params, "concat-total")
    if part is not None and (part < 1 or (total is not None and part > total)):
        raise WebhookError(400, "bad_concat-part", "concat-part must be in 1..concat-total")
    keyword = (params.get("keyword") or "").strip().upper()[:64] or first_word(text)
    return Inbound(
        message_id=message_id,
        phone=phone,
        to=to,
        text=text if kind != "binary" else "",
        type=kind,
        keyword=keyword,
        message_timestamp=_timestamp(params, "message-timestamp"),
        concat_ref=_optional(params, "concat-ref", 64),
        concat_total=total,
        concat_part=part,
    )


# --------------------------------------------------------------------------- keyword effects


@dataclass(frozen=True, slots=True)
class Replies:
    """What we answer to HELP, STOP and START (settings ``help_text`` and the confirmations)."""

    help: str = Settings.model_fields["help_text"].default
    stop: str = Settings.model_fields["stop_confirmation_text"].default
    start: str = Settings.model_fields["start_confirmation_text"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> Replies:
        return cls(
            settings.help_text, settings.stop_confirmation_text, settings.start_confirmation_text
        )


@dataclass(slots=True)
class InboundAction:
    """What an inbound text did (``apply_inbound``); the caller publishes and replies."""

    kind: KeywordKind
    phone: str
    user_ids: list[str]
    contacts: list[Contact] = field(default_factory=list)  # updated profiles for ``contacts``
    reply: str | None = None  # text to send back to ``phone``
    applied: bool = True  # False: an older keyword than the one already recorded


def apply_inbound(
    store: RedisStore,
    text: str | None,
    phone: str,
    at_ms: int,
    replies: Replies | None = None,
) -> InboundAction:
    """Apply one inbound text of ``phone`` (E.164) at ``at_ms`` to the consent state in Redis.

    STOP-class: the number is opted out at once (phone-level record, then each profile with that
    number in place); START-class: opted back in. ``at_ms`` orders keywords, so a retried older
    STOP cannot undo a newer START; the demo calls this in event time. Publishing the returned
    ``contacts`` and sending ``reply`` are the caller's job.
    """
    replies = replies or Replies()
    kind = classify(text)
    users = store.users_for_phone(phone)
    if kind == "help":
        return InboundAction(kind, phone, users, reply=replies.help)
    if kind == "other":
        return InboundAction(kind, phone, users)
    status = "opted_out" if kind == "stop" else "opted_in"
    source = f"sms:{first_word(text)}"
    if not store.set_phone_consent(phone, status, at_ms, source):  # type: ignore[arg-type]
        return InboundAction(kind, phone, users, applied=False)
    contacts = []
    for user in users:
        updated = store.set_consent(user, status, at_ms, source, phone=phone)  # type: ignore[arg-type]
        if updated is not None:
            contacts.append(updated)
    reply = replies.stop if kind == "stop" else replies.start
    return InboundAction(kind, phone, users, contacts, reply)


# --------------------------------------------------------------------------- Redis helpers

# KEYS: claim key. ARGV: lease ms. 'done' is final; a live 'busy' blocks a concurrent duplicate.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur == 'done' then return 'done' end
if cur then return 'busy' end
redis.call('SET', KEYS[1], 'busy', 'PX', ARGV[1])
return 'claimed'
"""

# KEYS: parts hash. ARGV: message id, part JSON, ttl. A part's final status is sticky.
_RECORD_PART = """
local final = {delivered=true, expired=true, failed=true, rejected=true, unknown=true}
local old = redis.call('HGET', KEYS[1], ARGV[1])
local keep = false
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and final[rec['s']] then keep = true end
end
if not keep then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: published-rank key. ARGV: rank, ttl. Returns the previous rank, or -1 (not higher).
_RAISE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= cur then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return cur
"""

# KEYS: published-rank key. ARGV: rank we set, previous rank, ttl.
_LOWER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '0' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
end
return 1
"""


class WebhookState:
    """The webhook service's own keys (prefix ``P``): ``Pwh:claim:*`` idempotency claims,
    ``Pwh:reply:*`` sent confirmations, ``Pwh:dlr:*`` per-part receipts and published ranks."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_ms: int) -> None:
        self.r = client
        self.base = f"{prefix}wh:"
        self.ttl_ms = ttl_ms
        self._claim = client.register_script(_CLAIM)
        self._record = client.register_script(_RECORD_PART)
        self._raise = client.register_script(_RAISE)
        self._lower = client.register_script(_LOWER)

    def claim(self, key: str) -> str:
        """``claimed`` (go ahead), ``done`` (already handled) or ``busy`` (in progress)."""
        result = self._claim(keys=[f"{self.base}claim:{key}"], args=[CLAIM_LEASE_MS])
        return result.decode() if isinstance(result, bytes) else str(result)

    def done(self, key: str) -> None:
        self.r.set(f"{self.base}claim:{key}", "done", px=self.ttl_ms)

    def release(self, key: str) -> None:
        self.r.delete(f"{self.base}claim:{key}")

    def claim_reply(self, message_id: str) -> bool:
        """At most one reply per inbound message, ever (a crash after this sends none)."""
        key = f"{self.base}reply:{message_id}"
        return bool(self.r.set(key, "1", nx=True, px=self.ttl_ms))

    def record_part(self, group: str, receipt: Receipt) -> dict[str, dict[str, Any]]:
        raw = self._record(
            keys=[f"{self.base}dlr:{group}"],
            args=[receipt.message_id, receipt.part_record(), self.ttl_ms],
        )
        parts: dict[str, dict[str, Any]] = {}
        for i in range(0, len(raw), 2):
            key = raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])
            try:
                parts[key] = json.loads(raw[i + 1])
            except ValueError:
                continue
        return parts

    def raise_rank(self, group: str, rank: int) -> int:
        return int(self._raise(keys=[f"{self.base}dlr:{group}:pub"], args=[rank, self.ttl_ms]))

    def lower_rank(self, group: str, rank: int, previous: int) -> None:
        self._lower(keys=[f"{self.base}dlr:{group}:pub"], args=[rank, previous, self.ttl_ms])


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


# --------------------------------------------------------------------------- Kafka


class AsyncProducer:
    """confluent-kafka producer whose deliveries resolve asyncio futures (a poll thread)."""

    def __init__(self, settings: Settings) -> None:
        self.producer = Producer(
            {**settings.kafka_common(), "enable.idempotence": True, "linger.ms": 2}
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="webhooks-producer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def produce(self, topic: str, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(err: KafkaError | None, _msg: Message) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, err)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits for this answer
                pass

        self.producer.produce(topic, value=value, key=key, on_delivery=settle)
        return future

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.producer.flush(10)


def _resolve(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(KafkaException(err))


class ContactsFollower:
    """Reads the contacts topic into Redis (profiles, as the dispatcher does, and the phone ->
    users index a STOP needs), to its end first and then as it grows. A daemon thread."""

    def __init__(self, settings: Settings, store: RedisStore, codec: Codec) -> None:
        self.settings = settings
        self.store = store
        self.codec = codec
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.applied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhooks-contacts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        consumer = Consumer(
            {
                **self.settings.kafka_common(),
                "group.id": f"nudgeflow-webhooks-contacts-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            topic = self.settings.topic_contacts
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                raise RuntimeError(f"contacts topic {topic!r} does not exist")
            parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
            consumer.assign(parts)
            ends: dict[int, int] = {}
            for tp in parts:
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
                if high > low:
                    ends[tp.partition] = high
            if not ends:
                self.ready.set()
            while not self._stop.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    if msg.error() is not None:
                        continue
                    self._apply(msg)
                    partition, offset = msg.partition() or 0, msg.offset() or 0
                    if partition in ends and offset + 1 >= ends[partition]:
                        del ends[partition]
                        if not ends:
                            self.ready.set()
                            log.info("contacts read to the end: %d profiles", self.applied)
        except BaseException as exc:  # noqa: BLE001 - reported through /healthz and run()
            self.error = exc
            log.error("contacts follower stopped: %s", type(exc).__name__)
        finally:
            consumer.close()

    def _apply(self, msg: Message) -> None:
        key = msg.key()
        if key is None:
            return
        user_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        offset = msg.offset() or 0
        value = msg.value()
        if value is None:
            if self.store.put_contact(user_id, None, offset):
                self.store.index_phone(user_id, None)
            return
        try:
            name, record = self.codec.decode(value)
        except CodecError as exc:
            log.warning("skipping undecodable contact at offset %d: %s", offset, exc)
            return
        if name != "ContactProfile":
            return
        if self.store.put_contact(user_id, record, offset):
            phone = record.get("phone")
            self.store.index_phone(user_id, phone if isinstance(phone, str) else None)
        self.applied += 1


def ensure_topics(settings: Settings, names: list[str], timeout: float = 15.0) -> list[str]:
    """Create the topics of ``names`` that do not exist yet (dev stacks); returns the created."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka_common())
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    new = [NewTopic(n, settings.partitions, settings.replication_factor) for n in missing]
    created = []
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


# --------------------------------------------------------------------------- the service


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


REPLY_PREFIX = "kw-"


def reply_client_ref(message_id: str) -> str:
    """client-ref of the reply to an inbound message (≤ 100 chars, no personal data)."""
    return REPLY_PREFIX + hashlib.blake2b(message_id.encode(), digest_size=12).hexdigest()


class WebhookService:
    """The aiohttp application and what it needs: Redis, a producer, the contacts follower and
    a gateway for confirmations (the dispatcher's gateway and shared rate limit)."""

    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        *,
        redis_client: redis.Redis | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        rate_per_s: float = 30.0,
        retry: RetryPolicy | None = None,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        """``clock``: epoch ms stamped on clicks and inbound texts (wall time; a replay of
        ``nudgeflow demo`` passes its event-time clock)."""
        self.settings = settings
        self.clock = clock
        self.gateway = gateway
        self.redis = redis_client or redis.Redis.from_url(settings.redis_url)
        self.store = RedisStore(self.redis, key_prefix)
        self.state = WebhookState(self.redis, key_prefix, int(settings.webhook_dedup_ttl_s * 1000))
        self.codec = Codec(settings.schema_registry_url)
        self.replies = Replies.from_settings(settings)
        self.limiter = RateLimiter(self.redis, rate_per_s, key=f"{key_prefix}ratelimit:gateway")
        self.retry = retry or RetryPolicy()
        self.max_body = settings.webhook_max_body_bytes
        secret = settings.webhook_signature_secret
        self.verifier = (
            SignatureVerifier(
                secret.get_secret_value(),
                settings.webhook_signature_method,
                settings.webhook_timestamp_tolerance_s,
            )
            if secret is not None and secret.get_secret_value()
            else None
        )
        self.follower = ContactsFollower(settings, self.store, self.codec)
        self.producer: AsyncProducer | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhooks")
        self._tasks: set[asyncio.Task[None]] = set()
        self.replies_sent = 0

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.max_body)
        for path, handler in ((DELIVERY_PATH, self.delivery), (INBOUND_PATH, self.inbound)):
            app.router.add_get(path, handler, allow_head=False)
            app.router.add_post(path, handler)
        app.router.add_get("/l/{code}", self.click)
        app.router.add_get("/healthz", self.healthz, allow_head=False)
        app.router.add_get("/metrics", self.metrics, allow_head=False)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        self.producer = AsyncProducer(self.settings)
        self.follower.start()

    async def _cleanup(self, _app: web.Application) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.follower.stop()
        if self.producer is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.producer.close)
            self.producer = None  # the client goes now, not with the last reference to us
        self._pool.shutdown(wait=True)
        self.gateway.close()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except WebhookError as exc:
            if isinstance(exc, SignatureError):
                endpoint = "delivery" if request.path == DELIVERY_PATH else "inbound"
                metrics.WEBHOOK_SIGNATURE_FAILURES.labels(endpoint).inc()
            log.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
            return web.json_response({"error": exc.reason, "detail": exc.detail}, status=exc.status)
        except web.HTTPException:
            raise
        except (TimeoutError, redis.RedisError, KafkaException, BufferError, OSError) as exc:
            log.warning("%s %s -> 503 (%s)", request.method, request.path, type(exc).__name__)
            return web.json_response(
                {"error": "unavailable", "detail": "try again later"},
                status=503,
                headers={"Retry-After": "5"},
            )

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _params(self, request: web.Request) -> dict[str, str]:
        params = await read_params(request, self.max_body)
        if self.verifier is not None:
            self.verifier.verify(params, time.time())
        return params

    async def _publish(
        self, topic: str, key: str | None, name: str, record: Mapping[str, Any]
    ) -> None:
        assert self.producer is not None
        value = self.codec.encode(name, record)
        future = self.producer.produce(topic, key.encode() if key else None, value)
        await asyncio.wait_for(future, PUBLISH_TIMEOUT_S)

    # ------------------------------------------------------------------ delivery receipts

    async def delivery(self, request: web.Request) -> web.StreamResponse:
        receipt = parse_receipt(await self._params(request))
        key = f"dlr:{receipt.message_id}:{receipt.status}"
        claim = await self._run(self.state.claim, key)
        if claim == "done":
            return _ok()
        if claim == "busy":
            raise WebhookError(409, "in_progress", "this receipt is being processed; retry later")
        try:
            await self._apply_receipt(receipt)
        except BaseException:
            await self._run(self.state.release, key)
            raise
        await self._run(self.state.done, key)
        return _ok()

    async def _apply_receipt(self, receipt: Receipt) -> None:
        ref = (
            await self._run(self.store.sent_ref, receipt.client_ref) if receipt.client_ref else None
        )
        if ref is None and receipt.client_ref and not receipt.client_ref.startswith(REPLY_PREFIX):
            # Not a text we know (yet): refuse without a trace. Vonage retries a non-2xx
            # receipt, so one that beat the dispatcher's send record matches on a retry.
            raise WebhookError(404, "unknown_client_ref", "no NudgeFlow text has this client-ref")
        group = receipt.client_ref or f"msg:{receipt.message_id}"
        parts = await self._run(self.state.record_part, group, receipt)
        folded = receipts.fold(
            {mid: str(p.get("s")) for mid, p in parts.items()}, ref.segments if ref else 1
        )
        if not folded.final and receipt.status not in receipts.PENDING:
            return  # e.g. part 1 of 2 delivered: nothing new to say until the text is complete
        previous = await self._run(self.state.raise_rank, group, folded.rank)
        if previous < 0:
            return  # this state (or a later one) is already published
        record = receipt_record(receipt, ref, group, parts, folded, self.clock())
        try:
            await self._publish(
                self.settings.topic_delivery,
                ref.user_id if ref else None,
                "DeliveryReceipt",
                record,
            )
        except BaseException:
            await self._run(self.state.lower_rank, group, folded.rank, previous)
            raise
        if folded.final:
            campaign = ref.campaign_id if ref else "unknown"
            metrics.DELIVERY_RECEIPTS.labels(campaign, folded.status).inc()

    # ------------------------------------------------------------------ inbound texts

    async def inbound(self, request: web.Request) -> web.StreamResponse:
        message = parse_inbound(await self._params(request))
        key = f"in:{message.message_id}"
        claim = await self._run(self.state.claim, key)
        if claim == "done":
            return _ok()
        if claim == "busy":
            raise WebhookError(409, "in_progress", "this message is being processed; retry later")
        try:
            await self._apply_inbound(message)
        except BaseException:
            await self._run(self.state.release, key)
            raise
        await self._run(self.state.done, key)
        return _ok()

    async def _apply_inbound(self, message: Inbound) -> None:
        now = self.clock()
        # The gateway's time orders keywords (a retried old STOP must not undo a newer START);
        # never later than now, or a bogus future time would pin the consent forever.
        stamp = message.message_timestamp
        at = min(stamp, now) if stamp is not None else now
        text = message.text if message.keyword_part else ""
        action: InboundAction = await self._run(
            apply_inbound, self.store, text, message.phone, at, self.replies
        )
        if action.kind == "other":
            user = action.user_ids[0] if action.user_ids else None
            await self._publish(
                self.settings.topic_inbound, user, "InboundSms", message.to_record(user, now)
            )
            return
        if action.contacts:
            await asyncio.gather(
                *(
                    self._publish(
                        self.settings.topic_contacts, c.user_id, "ContactProfile", c.to_record()
                    )
                    for c in action.contacts
                )
            )
        if action.kind == "stop" and action.applied:
            campaigns = [await self._run(self.store.last_campaign, u) for u in action.user_ids]
            for campaign in campaigns or [None]:
                metrics.OPT_OUTS.labels(campaign or "unknown").inc()
            log.info("opt-out recorded for %d profile(s)", len(action.user_ids))
        if action.reply and await self._run(self.state.claim_reply, message.message_id):
            user = action.user_ids[0] if action.user_ids else "-"
            reply = SmsMessage(
                decision_id=reply_client_ref(message.message_id),
                campaign_id=KEYWORD_CAMPAIGN,
                user_id=user,
                to=message.phone,
                text=action.reply,
                sent_at_ms=now,
                segments=measure(action.reply).segments,
                encoding=measure(action.reply).encoding,
            )
            task = asyncio.get_running_loop().create_task(self._send_reply(reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_reply(self, msg: SmsMessage) -> None:
        outcome = await self._run(self._send_reply_sync, msg)
        if outcome == "sent":
            self.replies_sent += 1
        else:
            log.warning("keyword reply %s not sent: %s", msg.decision_id, outcome)

    def _send_reply_sync(self, msg: SmsMessage) -> str:
        """Rate-limited like the dispatcher's texts; retryable errors are retried with backoff."""
        reason = "not_attempted"
        for attempt in range(max(1, self.retry.attempts)):
            self.limiter.acquire()
            try:
                self.gateway.send(msg)
                return "sent"
            except RetryableGatewayError as exc:
                reason = exc.reason
            except GatewayError as exc:
                return exc.reason
            except Exception as exc:  # noqa: BLE001 - never crash the service for a reply
                return f"unexpected_error:{type(exc).__name__}"
            finally:
                self.limiter.done()  # answered: the rate limit's lease ends (rate_limit.py)
            if attempt + 1 < self.retry.attempts:
                time.sleep(self.retry.delay_s(attempt))
        return reason

    async def wait_replies(self) -> None:
        """Wait for the confirmations in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ links

    async def click(self, request: web.Request) -> web.StreamResponse:
        code = request.match_info.get("code", "")
        if not is_valid_code(code):
            raise WebhookError(404, "unknown_link", "no such link")
        record = await self._run(self.store.link, code)
        try:
            target = LinkTarget.from_record(record) if record else None
        except LinkError:
            target = None
        if target is None:
            raise WebhookError(404, "unknown_link", "no such link")
        if request.method == "GET":  # HEAD (link previews, checkers) is not a click
            await self._emit_click(target, code)
        metrics.LINK_CLICKS.labels(target.campaign_id, metrics.variant_label(target.variant)).inc()
        raise web.HTTPFound(target.url)

    async def _emit_click(self, target: LinkTarget, code: str) -> None:
        """The click as a clickstream event; a broker hiccup must not break the redirect."""
        props = {
            "decision_id": target.decision_id,
            "campaign_id": target.campaign_id,
            "url": target.url[:MAX_VALUE_LEN],
            "code": code,
        }
        if target.variant:
            props["variant"] = target.variant
        try:
            event = validate(
                ClickEvent(
                    event_id=f"click-{uuid.uuid4().hex}",
                    user_id=target.user_id,
                    event_type=CLICK_EVENT_TYPE,
                    ts=self.clock(),
                    properties=props,
                )
            )
            assert self.producer is not None
            value = self.codec.encode("ClickEvent", event.to_record())
            future = self.producer.produce(
                self.settings.topic_clickstream, event.user_id.encode(), value
            )
            await asyncio.wait_for(future, CLICK_PUBLISH_TIMEOUT_S)
        except (TimeoutError, EventError, CodecError, KafkaException, BufferError) as exc:
            log.warning("click on %s not recorded: %s", code, type(exc).__name__)

    # ------------------------------------------------------------------ health

    async def healthz(self, _request: web.Request) -> web.StreamResponse:
        if self.follower.error is not None:
            return web.json_response({"status": "error", "contacts": "failed"}, status=503)
        if not self.follower.ready.is_set():
            return web.json_response({"status": "starting", "contacts": "loading"}, status=503)
        return web.json_response({"status": "ok", "signed": self.verifier is not None})

    async def metrics(self, _request: web.Request) -> web.StreamResponse:
        body = metrics.exposition().encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _ok() -> web.Response:
    return web.json_response({"status": "ok"})


# --------------------------------------------------------------------------- running it


class BackgroundServer:
    """The service on its own event loop in a thread (tests, the demo): ``url`` once started."""

    def __init__(self, service: WebhookService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhooks", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        follower = self.service.follower
        deadline = time.monotonic() + ready_timeout_s
        while not follower.ready.wait(0.05):
            if follower.error is not None or time.monotonic() > deadline:
                self.stop()
                why = type(follower.error).__name__ if follower.error else "timeout"
                raise RuntimeError(f"webhooks: contacts topic not read to its end ({why})")
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.service.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    def call(self, coro: Awaitable[Any], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (e.g. ``service.wait_replies()``)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default: NUDGEFLOW_WEBHOOK_HOST)")
    parser.add_argument("--port", type=int, help="listen port (default: NUDGEFLOW_WEBHOOK_PORT)")
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="Redis key prefix")
    parser.add_argument(
        "--rate",
        type=arguments.positive_rate,
        default=30.0,
        help="gateway requests/s shared with the dispatcher",
    )
    parser.add_argument(
        "--create-topics",
        action="store_true",
        help="create sms-delivery / sms-inbound if missing (always on with the dev profile)",
    )


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    logging.basicConfig(
        level=(settings.log_level or "info").upper(),  # NUDGEFLOW_LOG_LEVEL
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    secret = settings.webhook_signature_secret
    if (secret is None or not secret.get_secret_value()) and settings.profile != "dev":
        # Unsigned webhooks in production would let anyone opt numbers in or out.
        print(
            "nudgeflow webhooks: NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET (or _FILE) is required "
            "outside the dev profile",
            file=sys.stderr,
        )
        return 2
    if args.create_topics or settings.profile == "dev":
        ensure_topics(settings, [settings.topic_delivery, settings.topic_inbound])
    from processors.dispatcher import make_gateway

    try:
        gateway = make_gateway(settings)
        service = WebhookService(
            settings, gateway, key_prefix=args.key_prefix, rate_per_s=args.rate
        )
    except ValueError as exc:
        print(f"nudgeflow webhooks: {exc}", file=sys.stderr)
        return 2
    if service.verifier is None:
        log.warning("no NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET: webhooks are accepted unsigned")
    host = args.host or settings.webhook_host
    port = args.port if args.port is not None else settings.webhook_port
    log.info("webhooks on %s:%d (signed: %s)", host, port, service.verifier is not None)
    web.run_app(
        service.app(),
        host=host,
        port=port,
        access_log=None,
        print=None,
        handle_signals=True,
    )
    if service.follower.error is not None:
        return 1
    return 0
