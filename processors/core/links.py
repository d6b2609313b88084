"""Tracked short links: find the URLs of a rendered text and swap them for ``{base}/l/{code}``.

A template writes a plain URL (usually from a property, ``{{ link }}``); at send time every
``http(s)://`` URL of the text becomes a short link, one code per (decision, URL). The code is a
keyed hash of the two, so a retried or redelivered send gets the same code (idempotent) and
codes cannot be guessed from decision ids without the link secret. The webhook service resolves
``GET /l/{code}`` to the target and turns the click into a ``sms_link_click`` event.

Pure except for :class:`LinkShortener`, which talks to a :class:`LinkStore` (Redis in the
dispatcher; any mapping in tests).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final, Protocol

from processors.core.policy import SendPlan
from processors.core.rendering import measure

CODE_LENGTH: Final = 10
"""Base62 characters: ~59 bits, so 10 million live codes collide with odds of about 1e-4 (and a
collision is detected and resolved by the store anyway)."""
MAX_ATTEMPTS: Final = 8
CLICK_EVENT_TYPE: Final = "sms_link_click"

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CODE = re.compile(r"^[0-9A-Za-z]{6,32}$")
# Up to the first whitespace or character that cannot appear unescaped in a URL.
_URL = re.compile(r"https?://[^\s<>\"'`{}|\\^]+", re.IGNORECASE)
_TRAILING = ".,;:!?'\"*"  # sentence punctuation after a URL is not part of it
_CLOSERS = {")": "(", "]": "[", "}": "{"}


class LinkError(ValueError):
    """A short-link setting or record is invalid."""


@dataclass(frozen=True, slots=True)
class UrlSpan:
    start: int
    end: int
    url: str


@dataclass(frozen=True, slots=True)
class LinkTarget:
    """What a code points at (the Redis record of a short link)."""

    url: str
    decision_id: str
    campaign_id: str
    user_id: str
    variant: str | None = None

    def to_record(self) -> dict[str, str]:
        out = {
            "url": self.url,
            "decision_id": self.decision_id,
            "campaign_id": self.campaign_id,
            "user_id": self.user_id,
        }
        if self.variant is not None:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> LinkTarget:
        try:
            return cls(
                url=record["url"],
                decision_id=record["decision_id"],
                campaign_id=record["campaign_id"],
                user_id=record["user_id"],
                variant=record.get("variant") or None,
            )
        except KeyError as exc:
            raise LinkError(f"short-link record lacks {exc.args[0]}") from None


def _trim(url: str) -> str:
    """Drop trailing punctuation and unbalanced closing brackets ("(see https://x.io/a)")."""
    while url:
        last = url[-1]
        if last in _TRAILING:
            url = url[:-1]
        elif last in _CLOSERS and url.count(last) > url.count(_CLOSERS[last]):
            url = url[:-1]
        else:
            break
    return url


def find_urls(text: str) -> list[UrlSpan]:
    """Every ``http(s)://`` URL in ``text`` with its position (at least a host after ``//``)."""
    spans = []
    for match in _URL.finditer(text):
        url = _trim(match.group(0))
        if len(url) > len(url.split("//", 1)[0]) + 2:
            spans.append(UrlSpan(match.start(), match.start() + len(url), url))
    return spans


def replace_urls(text: str, replacement: Callable[[str], str | None]) -> str:
    """``text`` with each URL replaced by ``replacement(url)`` (None keeps the URL)."""
    out, pos = [], 0
    for span in find_urls(text):
        new = replacement(span.url)
        if new is None:
            continue
        out.append(text[pos : span.start])
        out.append(new)
        pos = span.end
    out.append(text[pos:])
    return "".join(out)


def make_code(
    decision_id: str,
    url: str,
    *,
    secret: bytes = b"",
    attempt: int = 0,
    length: int = CODE_LENGTH,
) -> str:
    """Deterministic base62 code of (decision, URL, attempt), keyed with ``secret``."""
    digest = hashlib.blake2b(
        f"{decision_id}\x1f{url}\x1f{attempt}".encode(), key=secret[:64], digest_size=16
    ).digest()
    number = int.from_bytes(digest, "big")
    chars = []
    for _ in range(length):
        number, rest = divmod(number, 62)
        chars.append(_ALPHABET[rest])
    return "".join(chars)


def is_valid_code(code: str) -> bool:
    """Shape check before any lookup (keeps garbage out of Redis keys and logs)."""
    return bool(_CODE.match(code))


def normalize_base(base_url: str) -> str:
    """``https://t.example/`` -> ``https://t.example``; rejects anything but http(s) URLs."""
    base = base_url.strip().rstrip("/")
    if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", base, re.IGNORECASE):
        raise LinkError("link base URL must be an http(s) URL without query or fragment")
    return base


def short_url(base_url: str, code: str) -> str:
    return f"{normalize_base(base_url)}/l/{code}"


class LinkStore(Protocol):
    def put_link(self, code: str, record: Mapping[str, str], ttl_ms: int) -> dict[str, str]:
        """Store ``record`` under ``code`` unless the code exists; return the stored record."""
        ...


class LinkShortener:
    """Replaces the URLs of outgoing texts with tracked short links stored in a ``LinkStore``.

    ``apply(plan)`` is what the dispatcher calls right before the gateway: it returns the plan
    with the new text (and the re-measured segments and encoding). If short links would make the
    text *longer* in segments (a long base URL), the text is left alone: a bigger bill is never
    worth a click count.
    """

    def __init__(self, store: LinkStore, base_url: str, ttl_ms: int, secret: bytes = b"") -> None:
        if ttl_ms <= 0:
            raise LinkError("link TTL must be positive")
        self.store = store
        self.base = normalize_base(base_url)
        self.ttl_ms = ttl_ms
        self.secret = secret

    @classmethod
    def maybe(
        cls, store: LinkStore, base_url: str | None, ttl_s: float, secret: str | None = None
    ) -> LinkShortener | None:
        """A shortener when ``base_url`` is set (settings ``link_*``), else None (links off)."""
        if not base_url:
            return None
        return cls(store, base_url, int(ttl_s * 1000), (secret or "").encode())

    def code_for(self, target: LinkTarget) -> str:
        """Store ``target`` and return its code (the same code on every retry)."""
        record = target.to_record()
        for attempt in range(MAX_ATTEMPTS):
            code = make_code(target.decision_id, target.url, secret=self.secret, attempt=attempt)
            stored = self.store.put_link(code, record, self.ttl_ms)
            if stored.get("decision_id") == target.decision_id and stored.get("url") == target.url:
                return code
        raise LinkError("could not find a free short-link code")  # ~impossible: 8 collisions

    def shorten(
        self,
        text: str,
        *,
        decision_id: str,
        campaign_id: str,
        user_id: str,
        variant: str | None = None,
    ) -> str:
        """``text`` with every URL (except our own short links) replaced by a short link."""

        def swap(url: str) -> str | None:
            if url.lower().startswith(f"{self.base.lower()}/l/"):
                return None
            target = LinkTarget(url, decision_id, campaign_id, user_id, variant)
            return f"{self.base}/l/{self.code_for(target)}"

        return replace_urls(text, swap)

    def apply(self, plan: SendPlan) -> SendPlan:
        """The plan with short links in its message (unchanged when there is no URL)."""
        msg = plan.message
        if not find_urls(msg.text):
            return plan
        new_text = self.shorten(
            msg.text,
            decision_id=msg.decision_id,
            campaign_id=msg.campaign_id,
            user_id=msg.user_id,
            variant=plan.decision.variant,
        )
        measured = measure(new_text)
        if measured.segments > msg.segments:
            return plan
        new_msg = replace(
            msg, text=new_text, segments=measured.segments, encoding=measured.encoding
        )
        return replace(plan, message=new_msg)
