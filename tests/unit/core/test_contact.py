"""Contact rows: E.164 normalisation, consent, zones, attributes and the record shape."""

from __future__ import annotations

import pytest

from processors.core.contact import (
    Contact,
    ContactError,
    normalize_phone,
    parse_contact_row,
    resolve_timezone,
    timezone_from_phone,
)

ROW = {
    "user_id": "u1",
    "phone": "+14155550100",
    "consent": "opted_in",
    "timezone": "America/Los_Angeles",
    "first_name": "Ana",
    "locale": "en-US",
}


def test_parse_full_row() -> None:
    contact = parse_contact_row(ROW)
    assert contact == Contact(
        user_id="u1",
        phone="+14155550100",
        consent="opted_in",
        timezone="America/Los_Angeles",
        first_name="Ana",
        locale="en-US",
    )
    assert contact.opted_in


@pytest.mark.parametrize(
    ("raw", "region", "e164"),
    [
        ("+1 (415) 555-0100", None, "+14155550100"),
        ("+1-415-555-0100", None, "+14155550100"),
        ("415 555 0100", "US", "+14155550100"),
        ("+91 98123 45678", None, "+919812345678"),
        ("+44 20 7946 0000", None, "+442079460000"),
    ],
)
def test_phone_normalised_to_e164(raw: str, region: str | None, e164: str) -> None:
    assert normalize_phone(raw, region) == e164
    assert parse_contact_row({**ROW, "phone": raw}, default_region=region).phone == e164


@pytest.mark.parametrize(
    "raw",
    ["4155550100", "+1415", "+15555550100", "not a number", "", None, 14155550100],
)
def test_invalid_phone_rejected_without_echoing_it(raw: object) -> None:
    with pytest.raises(ContactError, match="phone") as info:
        parse_contact_row({**ROW, "phone": raw})
    if isinstance(raw, str) and raw:
        assert raw not in str(info.value)


def test_consent_values() -> None:
    assert parse_contact_row({**ROW, "consent": "opted_out"}).consent == "opted_out"
    row = {k: v for k, v in ROW.items() if k != "consent"}
    assert parse_contact_row(row).consent == "unknown"
    with pytest.raises(ContactError, match="consent must be one of"):
        parse_contact_row({**ROW, "consent": "yes"})


def test_consent_at_and_source() -> None:
    contact = parse_contact_row(
        {**ROW, "consent_at": "2026-01-15T10:00:00+00:00", "consent_source": "checkout"}
    )
    assert contact.consent_at_ms == 1_768_471_200_000
    assert contact.consent_source == "checkout"
    assert parse_contact_row({**ROW, "consent_at": "1768471200000"}).consent_at_ms == (
        1_768_471_200_000
    )
    with pytest.raises(ContactError, match="consent_at"):
        parse_contact_row({**ROW, "consent_at": "yesterday"})


def test_unknown_timezone_rejected() -> None:
    with pytest.raises(ContactError, match="unknown IANA time zone"):
        parse_contact_row({**ROW, "timezone": "Mars/Olympus_Mons"})
    with pytest.raises(ContactError, match="unknown IANA time zone"):
        parse_contact_row({**ROW, "timezone": "../../etc/passwd"})


def test_optional_fields_blank_means_unset() -> None:
    contact = parse_contact_row({**ROW, "timezone": "", "first_name": " ", "locale": None})
    assert (contact.timezone, contact.first_name, contact.locale) == (None, None, None)


def test_user_id_required() -> None:
    with pytest.raises(ContactError, match="user_id"):
        parse_contact_row({k: v for k, v in ROW.items() if k != "user_id"})


def test_other_keys_become_string_attributes() -> None:
    contact = parse_contact_row(
        {**ROW, "plan": "gold", "orders": 3, "vip": True, "score": 1.5, "gone": None}
        | {"tags": ["a", "b"], "attributes": {"city": "SF"}}
    )
    assert contact.attributes == {
        "city": "SF",
        "plan": "gold",
        "orders": "3",
        "vip": "true",
        "score": "1.5",
        "tags": '["a","b"]',
    }


def test_timezone_from_phone() -> None:
    assert timezone_from_phone("+14155550100") == "America/Los_Angeles"
    assert timezone_from_phone("+919812345678") == "Asia/Kolkata"
    assert timezone_from_phone("+18005550100") is None  # toll-free spans the continent
    assert timezone_from_phone("+447700900123") is None  # Etc/Unknown


def test_resolve_timezone_order() -> None:
    contact = parse_contact_row({**ROW, "timezone": "Europe/Berlin"})
    assert resolve_timezone(contact, "UTC").key == "Europe/Berlin"
    no_zone = parse_contact_row({k: v for k, v in ROW.items() if k != "timezone"})
    assert resolve_timezone(no_zone, "UTC").key == "America/Los_Angeles"
    india = parse_contact_row({"user_id": "u2", "phone": "+91 98123 45678"})
    assert resolve_timezone(india, "UTC").key == "Asia/Kolkata"
    toll_free = parse_contact_row({"user_id": "u3", "phone": "+1 800 555 0100"})
    assert resolve_timezone(toll_free, "America/New_York").key == "America/New_York"
    with pytest.raises(ContactError, match="default time zone"):
        resolve_timezone(toll_free, "Nowhere/Land")


def test_record_round_trip() -> None:
    contact = parse_contact_row(
        {**ROW, "consent_at": 1_768_471_200_000, "consent_source": "web", "plan": "gold"}
    )
    record = contact.to_record()
    assert record == {
        "user_id": "u1",
        "phone": "+14155550100",
        "consent": {"status": "opted_in", "at": 1_768_471_200_000, "source": "web"},
        "timezone": "America/Los_Angeles",
        "first_name": "Ana",
        "locale": "en-US",
        "attributes": {"plan": "gold"},
    }
    assert Contact.from_record(record) == contact


@pytest.mark.parametrize(
    "patch",
    [
        {"phone": "4155550100"},
        {"consent": {"status": "maybe", "at": None, "source": None}},
        {"consent": "opted_in"},
        {"attributes": {"n": 3}},
        {"user_id": ""},
    ],
)
def test_from_record_rejects_bad_shapes(patch: dict[str, object]) -> None:
    record = parse_contact_row(ROW).to_record() | patch
    with pytest.raises(ContactError):
        Contact.from_record(record)
