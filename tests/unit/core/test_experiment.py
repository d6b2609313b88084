"""Variants (copy and send timing) and holdouts: deterministic, weighted, applied everywhere."""

from __future__ import annotations

import pytest

from processors.commands.backtest import run_backtest
from processors.core import experiment
from processors.core.campaign import CampaignError, parse_campaigns
from processors.core.contact import Contact
from processors.core.events import ClickEvent
from processors.core.policy.memory import simulate

T0 = 1_710_342_000_000  # 2024-03-13T15:00:00Z: daytime in New York
M = 60_000

DOC = {
    "caps": [],
    "campaigns": [
        {
            "id": "cart-recovery",
            "trigger": {"type": "absence", "start": ["add_to_cart"], "cancel": ["purchase"],
                        "after": "30m"},
            "message": {"template": "Your cart is waiting"},
            "variants": [
                {"id": "quick", "weight": 50, "after": "15m"},
                {"id": "patient", "weight": 50, "after": "60m",
                 "message": {"template": "Still want it?"}},
            ],
            "holdout": "10%",
        }
    ],
}  # fmt: skip


def test_assignment_is_deterministic_and_matches_weights_and_holdout_share() -> None:
    (c,) = parse_campaigns(DOC).campaigns
    users = [f"user-{i}" for i in range(100_000)]
    variants = [experiment.variant_id(c, u) for u in users]
    assert variants == [experiment.variant_id(c, u) for u in users]  # stable
    share_quick = variants.count("quick") / len(users)
    assert 0.48 <= share_quick <= 0.52
    holdout = sum(experiment.in_holdout(c, u) for u in users) / len(users)
    assert 0.08 <= holdout <= 0.12
    # holdout and variant are independent: the holdout is split like everyone else
    held = [v for u, v in zip(users, variants, strict=True) if experiment.in_holdout(c, u)]
    assert 0.45 <= held.count("quick") / len(held) <= 0.55


def test_uneven_weights() -> None:
    doc = {"campaigns": [{**DOC["campaigns"][0], "variants": [
        {"id": "a", "weight": 1}, {"id": "b", "weight": 3}]}]}  # fmt: skip
    (c,) = parse_campaigns(doc).campaigns
    share_b = sum(experiment.variant_id(c, f"u{i}") == "b" for i in range(100_000)) / 100_000
    assert 0.73 <= share_b <= 0.77


def test_variant_timing_drives_the_trigger_and_is_written_into_decisions() -> None:
    cs = parse_campaigns(DOC)
    (c,) = cs.campaigns
    users = [f"u{i}" for i in range(40)]
    events = [ClickEvent(f"e-{u}", u, "add_to_cart", T0, None, {}) for u in users]
    result = run_backtest(events, cs)
    assert len(result.decisions) == len(users)
    for d in result.decisions:
        expected = experiment.variant_id(c, d.user_id)
        assert d.variant == expected
        assert d.fire_at == T0 + (15 if expected == "quick" else 60) * M


def test_holdout_is_suppressed_and_variant_copy_is_rendered() -> None:
    cs = parse_campaigns(DOC)
    (c,) = cs.campaigns
    users = [f"u{i}" for i in range(200)]
    events = [ClickEvent(f"e-{u}", u, "add_to_cart", T0, None, {}) for u in users]
    decisions = run_backtest(events, cs).decisions
    contacts = [Contact(u, f"+1212555{i:04d}", "opted_in", timezone="America/New_York")
                for i, u in enumerate(users)]  # fmt: skip
    sim = simulate(decisions, [], cs, contacts)
    final = sim.final()
    texts = {m.user_id: m.text for m in sim.messages}
    for d in decisions:
        if experiment.in_holdout(c, d.user_id):
            assert (final[d.decision_id].status, final[d.decision_id].reason) == (
                "suppressed",
                "holdout",
            )
            assert d.user_id not in texts
        else:
            assert final[d.decision_id].status == "sent"
            first_line = texts[d.user_id].splitlines()[0]
            assert first_line == (
                "Still want it?" if d.variant == "patient" else "Your cart is waiting"
            )
    assert any(o.reason == "holdout" for o in final.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variants": [{"id": "x", "weight": 1, "count": 3}]}, "cannot override count"),
        ({"variants": [{"id": "x", "weight": 0}]}, "weight"),
        ({"variants": [{"id": "x"}, {"id": "x"}]}, "unique"),
        ({"holdout": "150%"}, "holdout"),
        ({"holdout": "lots"}, "holdout"),
    ],
)
def test_bad_experiment_config_names_campaign_and_field(change: dict, message: str) -> None:
    doc = {"campaigns": [{**DOC["campaigns"][0], **change}]}
    with pytest.raises(CampaignError, match="campaign 'cart-recovery'") as err:
        parse_campaigns(doc)
    assert message in str(err.value)


def test_the_engine_remembers_each_users_variant_as_assigned() -> None:
    """``Rules.pick`` hashes a user's variant once and then remembers it (a bounded memo): the
    remembered answer, and the one after the memo is emptied, are ``variant_id``'s."""
    from processors.core.engine import rules as rules_module

    campaigns = parse_campaigns(DOC)
    rules = rules_module.Rules(campaigns, None, "event")
    campaign, base = rules.machines[rules.index["cart-recovery"]]
    users = [f"u{i}" for i in range(300)]
    expected = {u: experiment.variant_id(campaign, u) for u in users}
    assert set(expected.values()) == {"quick", "patient"}
    for _ in range(2):
        for u in users:
            machine, variant = rules.pick(campaign, base, u)
            assert variant == expected[u]
            assert machine is rules.variant_machines["cart-recovery"][variant]
    rules.variant_ids["cart-recovery"].clear()
    assert [rules.pick(campaign, base, u)[1] for u in users] == [expected[u] for u in users]
