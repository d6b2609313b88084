"""Contact profiles in Redis and the consent a handset gave by keyword (STOP/START).

``P{u}:contact`` holds the profile at its offset on the compacted topic; ``Pphone:<e164>`` the
keyword consent of a number, which overrides every profile with that number until a START from
it; ``Pphone:<e164>:users`` / ``P{u}:phone`` index the numbers; ``Pphone:<e164>:timeline`` the
keywords of an event-clock replay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any, cast

from processors.core.contact import Consent, Contact, ContactError
from processors.redis.base import RedisBase, text

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PhoneConsent:
    """Consent a handset gave by keyword (STOP/START), independent of any profile."""

    status: Consent
    at_ms: int
    source: str | None = None


def parse_contact(raw: Any) -> Contact | None:
    return parse_contact_record(raw)[0]


def parse_contact_record(raw: Any) -> tuple[Contact | None, Any]:
    """The profile and the JSON it was read from (None, None when absent or unreadable)."""
    if raw is None:
        return None, None
    try:
        record = json.loads(raw)
        return Contact.from_record(record), record
    except (ContactError, ValueError):
        return None, None  # unreadable profile: treated as no contact (never texted)


def parse_phone_consent(raw: Sequence[Any]) -> PhoneConsent | None:
    status, at = text(raw[0]), text(raw[1])
    if status not in ("opted_out", "opted_in") or at is None:
        return None
    return PhoneConsent(status, int(at), text(raw[2]))  # type: ignore[arg-type]


def apply_phone_consent(contact: Contact, state: PhoneConsent | None) -> Contact:
    if state is None or state.status != "opted_out":
        return contact
    return dataclasses.replace(
        contact, consent="opted_out", consent_at_ms=state.at_ms, consent_source=state.source
    )


class ContactRecords(RedisBase):
    """Profiles (written by the contacts follower, read by the policy) and keyword consent."""

    def put_contact(self, user_id: str, record: dict[str, Any] | None, offset: int) -> bool:
        """Store the profile at ``offset`` of the contacts topic (None = tombstone: delete)."""
        value = "" if record is None else json.dumps(record, separators=(",", ":"))
        phone = record.get("phone") if record is not None else None
        return bool(
            self._script("put_contact")(
                keys=[f"{self.user_key(user_id)}:contact"],
                args=[int(offset), value, phone if isinstance(phone, str) else ""],
            )
        )

    def contact(self, user_id: str, as_of: int | None = None) -> Contact | None:
        contact = parse_contact(self.r.hget(f"{self.user_key(user_id)}:contact", "v"))
        if contact is None:
            return None
        if as_of is not None:
            contact = self.with_keyword_timeline(contact, as_of)
        return self.with_phone_consent(contact)

    def record_keyword(self, phone: str, status: str, at_ms: int) -> None:
        """Event-clock replays (``demo --inbound``): a STOP/START of ``phone`` at ``at_ms``,
        in force only for checks made at or after that time (see ``contact(as_of=...)``)."""
        if status not in ("opted_out", "opted_in"):
            raise ValueError(f"keyword consent must be opted_out or opted_in, got {status!r}")
        self.r.zadd(f"{self.phone_prefix}{phone}:timeline", {f"{at_ms}:{status}": at_ms})

    def with_keyword_timeline(self, contact: Contact, as_of: int) -> Contact:
        """The contact with the latest STOP/START at or before ``as_of`` applied. An entry that
        :meth:`record_keyword` cannot have written is skipped (an earlier STOP still holds)."""
        key = f"{self.phone_prefix}{contact.phone}:timeline"
        for entry in self.r.zrevrangebyscore(key, as_of, "-inf", start=0, num=16):
            at, _, status = (text(entry) or "").partition(":")
            if status in ("opted_out", "opted_in") and at.isdigit():
                return dataclasses.replace(
                    contact,
                    consent=cast(Consent, status),
                    consent_at_ms=int(at),
                    consent_source="sms:keyword",
                )
            log.warning("skipping an unreadable keyword timeline entry of a contact")
        return contact

    def with_phone_consent(self, contact: Contact) -> Contact:
        """The profile as the policy must see it: a STOP from its number overrides it."""
        if contact.consent == "opted_out":
            return contact
        return apply_phone_consent(contact, self.phone_consent(contact.phone))

    def phone_consent(self, phone: str) -> PhoneConsent | None:
        """The last keyword consent (STOP/START) received from ``phone`` (E.164), if any."""
        return parse_phone_consent(self.r.hmget(self.phone_prefix + phone, ["s", "at", "src"]))

    def phone_consents(self, phones: Sequence[str]) -> dict[str, PhoneConsent | None]:
        """:meth:`phone_consent` of each number, in one round trip (one per node on a
        cluster)."""
        pipe = self.r.pipeline(transaction=False)
        for phone in phones:
            pipe.hmget(self.phone_prefix + phone, ["s", "at", "src"])
        return {
            phone: parse_phone_consent(raw)
            for phone, raw in zip(phones, pipe.execute(), strict=True)
        }

    def set_phone_consent(self, phone: str, status: Consent, at_ms: int, source: str) -> bool:
        """Record a keyword consent of ``phone``; False when a newer one is already recorded.

        In force for the dispatcher as soon as this returns (``contact`` and ``start_call``).
        """
        if status not in ("opted_out", "opted_in"):
            raise ValueError(f"handset consent must be opted_out or opted_in, got {status!r}")
        keys = [self.phone_prefix + phone]
        return bool(self._script("set_phone_consent")(keys=keys, args=[status, int(at_ms), source]))

    def set_consent(
        self, user_id: str, status: Consent, at_ms: int, source: str, phone: str | None = None
    ) -> Contact | None:
        """Set the consent of the stored profile of ``user_id`` in place; the updated profile.

        None when there is no readable profile, its number is not ``phone`` (when given), or
        its consent is newer than ``at_ms``. The caller publishes the result to the contacts
        topic (whose record then replaces this one).
        """
        key = f"{self.user_key(user_id)}:contact"
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
            if self._script("swap_contact")(keys=[key], args=[raw, new, updated.phone]):
                return updated
        raise RuntimeError("contact record kept changing; consent not set")

    def index_phone(self, user_id: str, phone: str | None) -> None:
        """Keep the phone -> users index current (``None``: the profile was deleted).

        On a cluster the number's set and the user's key are in different slots: the user joins
        the new number's set first, then the user's key changes, then the user leaves the old
        number's set (a crash in between leaves an extra member, which ``set_consent``'s number
        check makes harmless, never a missing one)."""
        key = f"{self.user_key(user_id)}:phone"
        if not self.cluster:
            self._script("index_phone")(keys=[key], args=[user_id, phone or "", self.phone_prefix])
            return
        if phone:
            self.r.sadd(f"{self.phone_prefix}{phone}:users", user_id)
        old = text(self._script("swap_phone")(keys=[key], args=[phone or ""]))
        if old and old != phone:
            self.r.srem(f"{self.phone_prefix}{old}:users", user_id)

    def users_for_phone(self, phone: str) -> list[str]:
        """Ids of the profiles with this number, sorted."""
        members = self.r.smembers(f"{self.phone_prefix}{phone}:users")
        return sorted(text(m) or "" for m in members)  # type: ignore[union-attr]
