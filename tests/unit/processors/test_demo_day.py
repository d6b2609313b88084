"""The realistic day of ``nudgeflow demo``: deterministic, covers every live action, and its
shoppers respond to texts (not to holdouts), sooner texts more than later ones."""

from __future__ import annotations

from collections import Counter

from processors.commands.backtest import run_backtest
from processors.core.campaign import load_campaigns
from processors.core.contact import normalize_phone
from processors.demo.day import day_contacts, day_events
from processors.demo.responses import Sent, plan_responses, short_code
from processors.demo.run import EXAMPLES
from processors.simulate import DAY, MINUTE

CAMPAIGNS = load_campaigns(EXAMPLES / "campaigns.yaml")


def test_the_day_is_one_day_the_same_every_time_and_triggers_every_campaign() -> None:
    events = list(day_events(users=400, seed=3))
    assert [e.event_id for e in events] == [e.event_id for e in day_events(users=400, seed=3)]
    assert events[-1].ts - events[0].ts < DAY
    decided = Counter(d.campaign_id for d in run_backtest(events, CAMPAIGNS).decisions)
    assert set(decided) == {c.id for c in CAMPAIGNS.campaigns}


def test_contacts_span_zones_and_a_consent_mix_with_valid_unique_numbers() -> None:
    rows = day_contacts(users=2_000, seed=3)
    assert 1_800 < len(rows) < 2_000  # some shoppers have no contact on file
    consent = Counter(r["consent"] for r in rows)
    assert set(consent) == {"opted_in", "opted_out", "unknown"}
    assert consent["opted_in"] > 0.75 * len(rows)
    assert len({r.get("timezone") for r in rows}) >= 6  # several zones, and some from the number
    phones = [normalize_phone(r["phone"]) for r in rows]
    assert len(set(phones)) == len(phones)


def _plan(sent_lag_ms: int, seed: int = 7) -> tuple[list, list]:
    """Cart-recovery decisions of 3,000 users: half texted (``sent_lag_ms`` after the trigger),
    half held out."""
    events = [e for e in day_events(users=2_000, seed=seed)]
    decisions = [d for d in run_backtest(events, CAMPAIGNS).decisions
                 if d.campaign_id == "cart-recovery"]  # fmt: skip
    texted = decisions[::2]
    final = {d.decision_id: "sent" for d in texted}
    final |= {d.decision_id: "suppressed" for d in decisions[1::2]}
    sent = {
        d.decision_id: Sent(d.decision_id, d.trigger_ts + sent_lag_ms,
                            f"Your cart: http://127.0.0.1:1/l/code{i:06d}")
        for i, d in enumerate(texted)
    }  # fmt: skip
    return decisions, plan_responses(decisions, final, sent, CAMPAIGNS, seed)


def test_shoppers_answer_texts_deterministically_and_sooner_texts_more() -> None:
    decisions, soon = _plan(30 * MINUTE)
    assert soon == _plan(30 * MINUTE)[1]
    texted = {d.decision_id for d in decisions[::2]}
    clicks = [r for r in soon if r.kind == "click"]
    assert clicks and all(r.decision_id in texted for r in clicks)  # only texts get clicked
    assert all(r.code == short_code(f"x http://h/l/{r.code}") for r in clicks)
    buys = Counter(r.decision_id in texted for r in soon if r.event_type == "purchase")
    assert buys[True] > 1.5 * buys[False] > 0  # the holdout still buys by itself, less often
    by_id = {d.decision_id: d for d in decisions}
    for r in soon:
        assert r.ts > by_id[r.decision_id].fire_at  # responses follow the decision
    _decisions, late = _plan(8 * 60 * MINUTE)
    assert len([r for r in late if r.kind == "click"]) < 0.8 * len(clicks)
