"""Contact profiles: who may be texted (consent), where (E.164), and when (time zone).

Rows from the contacts file are validated here so a bad row is rejected with a reason instead
of turning into a text to a malformed number or at 3 a.m. Errors never contain the phone number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_timezone

Consent = Literal["opted_in", "opted_out", "unknown"]
CONSENT_VALUES: frozenset[str] = frozenset({"opted_in", "opted_out", "unknown"})

# Legacy spellings that phonenumbers still returns, mapped to their current IANA names (pure
# renames only: zoneinfo accepts both, but outcomes and logs should show the current name).
_RENAMED_ZONES = {
    "Asia/Calcutta": "Asia/Kolkata",
    "Asia/Katmandu": "Asia/Kathmandu",
    "Asia/Rangoon": "Asia/Yangon",
    "Africa/Asmera": "Africa/Asmara",
    "America/Buenos_Aires": "America/Argentina/Buenos_Aires",
    "America/Godthab": "America/Nuuk",
    "Atlantic/Faeroe": "Atlantic/Faroe",
    "Pacific/Enderbury": "Pacific/Kanton",
    "Pacific/Ponape": "Pacific/Pohnpei",
    "Pacific/Truk": "Pacific/Chuuk",
}
_UNKNOWN_ZONE = "Etc/Unknown"
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_KNOWN_KEYS = frozenset(
    {"user_id", "phone", "consent", "consent_at", "consent_source", "timezone", "first_name"}
    | {"locale", "attributes"}
)


class ContactError(ValueError):
    """A contact row or record is invalid; the message says which field and why."""


@dataclass
class Contact:
    user_id: str
    phone: str  # E.164
    consent: Consent = "unknown"
    consent_at_ms: int | None = None
    consent_source: str | None = None
    timezone: str | None = None
    first_name: str | None = None
    locale: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def opted_in(self) -> bool:
        return self.consent == "opted_in"

    def to_record(self) -> dict[str, Any]:
        """The Avro ``ContactProfile`` shape (value of the compacted ``contacts`` topic)."""
        return {
            "user_id": self.user_id,
            "phone": self.phone,
            "consent": {
                "status": self.consent,
                "at": self.consent_at_ms,
                "source": self.consent_source,
            },
            "timezone": self.timezone,
            "first_name": self.first_name,
            "locale": self.locale,
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Contact:
        """Inverse of ``to_record``; validates shape so a foreign record cannot poison sends.

        The phone is only checked to be E.164-shaped (not re-validated against numbering-plan
        metadata, which changes between library versions).
        """
        if not isinstance(record, Mapping):
            raise ContactError(f"contact record must be a mapping, got {type(record).__name__}")
        user_id = _required_str(record, "user_id")
        phone = record.get("phone")
        if not isinstance(phone, str) or not _E164.match(phone):
            raise ContactError(f"contact {user_id}: phone is not an E.164 number")
        consent = record.get("consent")
        if not isinstance(consent, Mapping):
            raise ContactError(f"contact {user_id}: consent must be {{status, at, source}}")
        attributes = record.get("attributes") or {}
        if not isinstance(attributes, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
        ):
            raise ContactError(f"contact {user_id}: attributes must map strings to strings")
        at = consent.get("at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int)):
            raise ContactError(f"contact {user_id}: consent.at must be epoch millis or null")
        return cls(
            user_id=user_id,
            phone=phone,
            consent=_consent(consent.get("status"), user_id),
            consent_at_ms=at,
            consent_source=_optional_str(consent, "source", user_id),
            timezone=_optional_str(record, "timezone", user_id),
            first_name=_optional_str(record, "first_name", user_id),
            locale=_optional_str(record, "locale", user_id),
            attributes=dict(attributes),
        )


def _required_str(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ContactError(f"contact field {key} is required and must be a non-empty string")
    return value.strip()


def _optional_str(row: Mapping[str, Any], key: str, user_id: str) -> str | None:
    """Missing, null and blank (an empty CSV cell) all mean "not set"."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ContactError(f"contact {user_id}: {key} must be a string")
    return value.strip() or None


def _consent(value: Any, user_id: str) -> Consent:
    if not isinstance(value, str) or value not in CONSENT_VALUES:
        got = repr(value[:40]) if isinstance(value, str) else f"a {type(value).__name__}"
        raise ContactError(
            f"contact {user_id}: consent must be one of opted_in, opted_out, unknown; got {got}"
        )
    return cast(Consent, value)


def normalize_phone(raw: Any, default_region: str | None = None) -> str:
    """Parse and validate a phone number, returning E.164 (``+14155550100``).

    Without ``default_region`` the number must be international (start with ``+``). The error
    never repeats the number: it would land in logs.
    """
    if isinstance(raw, bool) or not isinstance(raw, str) or not raw.strip():
        raise ContactError("phone must be a non-empty string")
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        hint = " (add the +country code)" if not raw.strip().startswith("+") else ""
        reason = str(exc.args[0] if exc.args else "unparseable").rstrip(".")
        raise ContactError(f"phone is not a valid number: {reason}{hint}") from None
    if not phonenumbers.is_valid_number(number):
        raise ContactError("phone is not a valid number for its country's numbering plan")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _validate_zone(name: str, user_id: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ContactError(f"contact {user_id}: unknown IANA time zone {name!r}") from None
    return name


def _consent_at(value: Any, user_id: str) -> int | None:
    """Epoch millis (int, or digits from a CSV cell) or an ISO-8601 time with an offset."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            return int(text)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return int(moment.timestamp() * 1000)
    raise ContactError(
        f"contact {user_id}: consent_at must be epoch millis or an ISO-8601 time with an offset"
    )


def _attribute_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def parse_contact_row(row: Mapping[str, Any], default_region: str | None = None) -> Contact:
    """Validate one row of the contacts file (JSON Lines or CSV) into a ``Contact``.

    Required: ``user_id``, ``phone`` (normalised to E.164; ``default_region`` such as ``"US"``
    allows national numbers). Optional: ``consent`` (``opted_in``/``opted_out``/``unknown``,
    missing means ``unknown``), ``consent_at``, ``consent_source``, ``timezone`` (IANA name),
    ``first_name``, ``locale``, ``attributes`` (a mapping). Every other key becomes a string
    attribute; null values are skipped, nested values are JSON-encoded.
    """
    if not isinstance(row, Mapping):
        raise ContactError(f"contact row must be a mapping, got {type(row).__name__}")
    user_id = _required_str(row, "user_id")
    try:
        phone = normalize_phone(row.get("phone"), default_region)
    except ContactError as exc:
        raise ContactError(f"contact {user_id}: {exc}") from None
    raw_consent = row.get("consent")
    consent = _consent(
        "unknown" if raw_consent is None or raw_consent == "" else raw_consent, user_id
    )
    zone = _optional_str(row, "timezone", user_id)
    nested = row.get("attributes")
    if nested is not None and not isinstance(nested, Mapping):
        raise ContactError(f"contact {user_id}: attributes must be a mapping")
    attributes: dict[str, str] = {}
    extra = {k: v for k, v in row.items() if k not in _KNOWN_KEYS}
    for key, value in [*(nested or {}).items(), *extra.items()]:
        if value is not None:
            attributes[str(key)] = _attribute_value(value)
    return Contact(
        user_id=user_id,
        phone=phone,
        consent=consent,
        consent_at_ms=_consent_at(row.get("consent_at"), user_id),
        consent_source=_optional_str(row, "consent_source", user_id),
        timezone=_validate_zone(zone, user_id) if zone else None,
        first_name=_optional_str(row, "first_name", user_id),
        locale=_optional_str(row, "locale", user_id),
        attributes=attributes,
    )


# Fixed instants (a northern winter and summer day) at which candidate zones' offsets are
# compared; fixed so the answer never depends on when the code runs.
_REFERENCE_INSTANTS = (
    datetime(2025, 1, 15, 12, tzinfo=UTC),
    datetime(2025, 7, 15, 12, tzinfo=UTC),
)
_MAX_ZONE_SPREAD = timedelta(hours=1)


@lru_cache(maxsize=4096)
def _pick_zone(zones: tuple[str, ...]) -> str | None:
    """First zone, if all candidates agree within an hour at the reference instants."""
    if not zones:
        return None
    if len(zones) > 1:
        try:
            infos = [ZoneInfo(z) for z in zones]
        except (ZoneInfoNotFoundError, ValueError):
            return None
        for instant in _REFERENCE_INSTANTS:
            offsets = [cast(timedelta, instant.astimezone(z).utcoffset()) for z in infos]
            if max(offsets) - min(offsets) > _MAX_ZONE_SPREAD:
                return None
    return _RENAMED_ZONES.get(zones[0], zones[0])


def timezone_from_phone(phone: str) -> str | None:
    """The IANA zone of a number according to its numbering plan, when that is unambiguous.

    phonenumbers lists every zone a prefix may be in. We take the first one when all of them
    agree within an hour (Idaho's +1 208 gives Boise and Los_Angeles) and give up otherwise
    (toll-free +1 800 gives 42 zones from America/Adak to Pacific/Guam), as we do for
    ``Etc/Unknown`` (e.g. many mobile ranges): a wrong guess would put quiet hours hours off.
    """
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return None
    zones = tuple(z for z in phone_timezone.time_zones_for_number(number) if z != _UNKNOWN_ZONE)
    return _pick_zone(zones)


def resolve_timezone(contact: Contact, default_tz: str) -> ZoneInfo:
    """Recipient's zone: the profile's, else the phone number's, else ``default_tz``.

    A profile zone that is not a known IANA name (possible only for records written by other
    tools) is skipped rather than failing the send.
    """
    for name in (contact.timezone, timezone_from_phone(contact.phone)):
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    try:
        return ZoneInfo(default_tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ContactError(f"default time zone {default_tz!r} is not a known IANA zone") from None
