"""The gateway budget's arithmetic: how many requests per window, and the margin it keeps."""

from __future__ import annotations

import pytest

from processors.redis.rate_limit import Budget


def test_the_window_keeps_a_margin_below_the_gateway_limit() -> None:
    """30/s is enforced as 30 per 1.01 s, slots 33.7 ms apart: the budget stays under the
    gateway's 30 in any second even when its clock and Redis' disagree by a few ms."""
    budget = Budget.for_rate(30)
    assert budget.limit == 30
    assert budget.window_s == pytest.approx(1.01)
    assert budget.spacing_s == pytest.approx(1.01 / 30)
    assert budget.limit / budget.window_s < 30


def test_fractional_and_slow_rates() -> None:
    assert Budget.for_rate(0.5, margin=0).window_s == pytest.approx(2.0)
    assert Budget.for_rate(30.5, margin=0).window_s == pytest.approx(30 / 30.5)
    assert Budget.for_rate(0.5).limit == 1


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_a_rate_that_is_not_positive_and_finite_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        Budget.for_rate(rate)


@pytest.mark.parametrize("margin", [-0.1, 1.0])
def test_a_margin_outside_zero_to_one_is_refused(margin: float) -> None:
    with pytest.raises(ValueError, match="margin must be"):
        Budget.for_rate(30, margin=margin)
