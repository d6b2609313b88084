"""Frequency caps: exact window boundaries, scopes, parsing errors."""

from __future__ import annotations

import pytest

from processors.core.cap import (
    CapError,
    CapRule,
    SendRecord,
    check_caps,
    longest_window_ms,
    parse_caps,
    rule_key,
)

H = 3_600_000
T0 = 1_767_000_000_000


def test_window_is_half_open_at_per_boundary() -> None:
    rule = CapRule(max=1, per_ms=4 * H, scope="global")
    sends = [SendRecord("cart", T0)]
    assert check_caps([rule], sends, T0) == rule
    assert check_caps([rule], sends, T0 + 4 * H - 1) == rule
    assert check_caps([rule], sends, T0 + 4 * H) is None


def test_max_counts_up_to_limit() -> None:
    rule = CapRule(max=2, per_ms=H, scope="global")
    assert check_caps([rule], [SendRecord("a", T0)], T0 + 10) is None
    assert check_caps([rule], [SendRecord("a", T0), SendRecord("b", T0 + 5)], T0 + 10) == rule
    # The older send leaves the window first.
    assert check_caps([rule], [SendRecord("a", T0), SendRecord("b", T0 + 5)], T0 + H) is None


def test_future_sends_count() -> None:
    rule = CapRule(max=1, per_ms=H, scope="global")
    assert check_caps([rule], [SendRecord("a", T0 + 1000)], T0) == rule


def test_campaign_scope_counts_only_its_campaign() -> None:
    per_campaign = CapRule(max=1, per_ms=24 * H, scope="cart")
    sends = [SendRecord("browse", T0)]
    assert check_caps([per_campaign], sends, T0 + 1) is None
    assert check_caps([per_campaign], [SendRecord("cart", T0)], T0 + 1) == per_campaign


def test_global_counts_every_campaign_and_first_violation_wins() -> None:
    global_rule = CapRule(max=2, per_ms=24 * H, scope="global")
    campaign_rule = CapRule(max=1, per_ms=24 * H, scope="cart")
    sends = [SendRecord("cart", T0), SendRecord("browse", T0 + 1)]
    assert check_caps([global_rule, campaign_rule], sends, T0 + 2) == global_rule
    assert check_caps([campaign_rule, global_rule], sends, T0 + 2) == campaign_rule


def test_other_campaign_rules_skipped_when_campaign_given() -> None:
    other = CapRule(max=1, per_ms=H, scope="browse")
    sends = [SendRecord("browse", T0)]
    assert check_caps([other], sends, T0 + 1) == other
    assert check_caps([other], sends, T0 + 1, campaign_id="cart") is None
    assert check_caps([other], sends, T0 + 1, campaign_id="browse") == other


def test_rule_key_and_describe() -> None:
    rule = CapRule(max=1, per_ms=4 * H, scope="global")
    assert rule_key(rule) == "global:1/4h"
    assert rule.describe() == "1 per 4h"
    assert rule_key(CapRule(max=3, per_ms=30 * 60_000, scope="cart")) == "cart:3/30m"


def test_parse_caps() -> None:
    rules = parse_caps([{"max": 1, "per": "4h"}, {"max": 3, "per": "1d"}], "cart")
    assert rules == [CapRule(1, 4 * H, "cart"), CapRule(3, 24 * H, "cart")]
    assert parse_caps(None, "global") == []
    assert longest_window_ms(rules) == 24 * H
    assert longest_window_ms([]) == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max": 1, "per": "4h"}, "must be a list"),
        (["1/4h"], r"caps\[0\]: expected a mapping"),
        ([{"max": 1}], r"caps\[0\]\.per: required"),
        ([{"per": "4h"}], r"caps\[0\]\.max: required"),
        ([{"max": 0, "per": "4h"}], r"caps\[0\]\.max: must be a positive integer"),
        ([{"max": True, "per": "4h"}], r"caps\[0\]\.max"),
        ([{"max": "1", "per": "4h"}], r"caps\[0\]\.max"),
        ([{"max": 1, "per": "4 hours"}], r"caps\[0\]\.per: invalid duration"),
        ([{"max": 1, "per": "0s"}], r"caps\[0\]\.per: must be longer than 0"),
        ([{"max": 1, "per": "4h", "every": 2}], r"caps\[0\]: unknown field\(s\) every"),
    ],
)
def test_parse_caps_errors(raw: object, message: str) -> None:
    with pytest.raises(CapError, match=message):
        parse_caps(raw, "cart")


def test_parse_caps_needs_scope() -> None:
    with pytest.raises(CapError):
        parse_caps([], "")
