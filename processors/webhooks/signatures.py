"""Vonage webhook signatures: HMAC-MD5/SHA1/SHA256/SHA512 through the vonage SDK's
``Auth.check_signature``, the legacy MD5 hash, and the timestamp's freshness."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

from processors.webhooks.errors import SignatureError

SIGNATURE_METHODS: Final = ("md5hash", "md5", "sha1", "sha256", "sha512")

_DIGITS = re.compile(r"^[0-9]+$")  # ASCII only: str.isdigit() also accepts "²" and "١"


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
