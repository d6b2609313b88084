"""Webhook request parameters: reading them (query, form or JSON, bounded) and Vonage's
delivery-receipt and inbound-SMS fields, validated (a bad field: ``WebhookError(400)``)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from processors.core import receipts
from processors.core.keywords import first_word
from processors.webhooks.errors import WebhookError

MAX_FIELDS: Final = 100

_MSISDN = re.compile(r"^\+?([1-9][0-9]{6,14})$")
_DIGITS = re.compile(r"^[0-9]+$")  # ASCII only: str.isdigit() also accepts "²" and "١"


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
        return json_params(body)
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


def json_params(body: bytes) -> dict[str, str]:
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
