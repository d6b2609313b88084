"""The dispatcher's ordered policy (processors.core.policy) over the in-memory store, and the
campaign-file additions it reads (caps, quiet hours, max_defer, max_segments, footer)."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import pytest

from processors.core.campaign import CampaignError, parse_campaigns
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy import Policy, RetryPolicy, SendPlan, Step, deliver
from processors.core.policy.memory import InMemoryStore, simulate, simulate_dispatch
from processors.gateways.base import PermanentGatewayError, RetryableGatewayError, SendResult

H = 3_600_000
FOOTER = "Reply STOP to opt out"


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def campaigns(**top: Any) -> Any:
    doc: dict[str, Any] = {
        "campaigns": [
            {
                "id": "cart",
                "trigger": {"type": "absence", "start": "add_to_cart", "cancel": "purchase",
                            "after": "30m"},
                "message": {"template": "Hi {{ first_name | default('there') }}, "
                            "{{ product_name | default('your cart') }} is waiting"},
                **top.pop("cart", {}),
            },
            {
                "id": "promo",
                "trigger": {"type": "event", "event": "signup"},
                "message": {"template": "Welcome!", "footer": None},
                **top.pop("promo", {}),
            },
        ],
        **top,
    }  # fmt: skip
    return parse_campaigns(doc)


ANA = Contact("u-ana", "+14155550100", "opted_in", timezone="America/Los_Angeles", first_name="Ana")
RAVI = Contact("u-ravi", "+919812345678", "opted_in", timezone="Asia/Kolkata", first_name="Ravi")
OUT = Contact("u-out", "+14155550101", "opted_out")
UNK = Contact("u-unk", "+14155550102", "unknown")


def decision(
    did: str, user: str = "u-ana", at: str = "2024-03-13T18:00:00Z", **kw: Any
) -> Decision:
    return Decision(
        decision_id=did,
        campaign_id=kw.pop("campaign", "cart"),
        user_id=user,
        fire_at=ms(at),
        trigger_event_ids=("e1",),
        trigger_ts=ms(at),
        **kw,
    )


def make(cs: Any = None, contacts: tuple[Contact, ...] = (ANA, RAVI, OUT, UNK)) -> Policy:
    store = InMemoryStore(contacts={c.user_id: c for c in contacts})
    return Policy(cs or campaigns(), store, event_clock=True)


def send_ok(policy: Policy, step: Step) -> SmsOutcome:
    """Play the shell: gateway accepts, return the final outcome."""
    assert step.send is not None, step.outcomes
    assert policy.begin_call(step.send) is None
    done = policy.complete(step.send, SendResult("m-1", "0.03", None, None), step.send.now_ms)
    (outcome,) = done.outcomes
    return outcome


# --------------------------------------------------------------------------- consent, basics


def test_opted_in_contact_gets_rendered_text_with_footer() -> None:
    policy = make()
    d = decision("d1", properties={"product_name": "trail shoes"})
    step = policy.on_decision(d, d.fire_at)
    assert step.outcomes == []
    assert step.send is not None
    msg = step.send.message
    assert msg.text == f"Hi Ana, trail shoes is waiting\n{FOOTER}"
    assert (msg.to, msg.encoding, msg.segments, msg.sent_at_ms) == (
        "+14155550100", "GSM-7", 1, d.fire_at
    )  # fmt: skip
    outcome = send_ok(policy, step)
    assert (outcome.status, outcome.message_id, outcome.price, outcome.segments) == (
        "sent", "m-1", "0.03", 1
    )  # fmt: skip


@pytest.mark.parametrize(
    ("user", "reason"),
    [("u-out", "opted_out"), ("u-unk", "no_consent"), ("u-nobody", "no_contact")],
)
def test_no_consent_is_suppressed(user: str, reason: str) -> None:
    policy = make()
    d = decision("d1", user=user)
    step = policy.on_decision(d, d.fire_at)
    assert step.send is None
    assert [(o.status, o.reason) for o in step.outcomes] == [("suppressed", reason)]


def test_unknown_campaign_fails_without_sending() -> None:
    policy = make()
    d = decision("d1", campaign="gone")
    step = policy.on_decision(d, d.fire_at)
    assert step.send is None and [(o.status, o.reason) for o in step.outcomes] == [
        ("failed", "unknown_campaign")
    ]


def test_footer_only_on_first_text_to_a_contact() -> None:
    cs = campaigns(caps=[])
    policy = make(cs)
    first = policy.on_decision(decision("d1"), ms("2024-03-13T18:00:00Z"))
    send_ok(policy, first)
    second = policy.on_decision(
        decision("d2", at="2024-03-13T19:00:00Z"), ms("2024-03-13T19:00:00Z")
    )
    assert first.send is not None and second.send is not None
    assert first.send.message.text.endswith(FOOTER)
    assert not second.send.message.text.endswith(FOOTER)


def test_too_long_and_missing_variable_fail_and_release_the_cap() -> None:
    cs = campaigns(cart={"max_segments": 1,
                         "message": {"template": "{{ product_name | default('x') }}"}})  # fmt: skip
    policy = make(cs)
    long = decision("d1", properties={"product_name": "é" * 200})
    step = policy.on_decision(long, long.fire_at)
    assert [(o.status, o.reason) for o in step.outcomes] == [("failed", "too_long")]
    # The failed send does not count against the cap: the next one goes.
    ok = decision("d2", at="2024-03-13T18:01:00Z", properties={"product_name": "socks"})
    assert policy.on_decision(ok, ok.fire_at).send is not None


# --------------------------------------------------------------------------- idempotency


def test_redelivered_decision_is_not_evaluated_twice() -> None:
    policy = make()
    d = decision("d1")
    outcome = send_ok(policy, policy.on_decision(d, d.fire_at))
    # Redelivery before the outcome was published: the same outcome again, no send.
    again = policy.on_decision(d, d.fire_at)
    assert again.send is None and again.outcomes == [outcome]
    policy.store.mark_emitted(d, outcome.status)
    assert policy.on_decision(d, d.fire_at).outcomes == []


def test_crash_between_gateway_call_and_record_gives_unknown_after_crash() -> None:
    policy = make()
    d = decision("d1")
    step = policy.on_decision(d, d.fire_at)
    assert step.send is not None and policy.begin_call(step.send) is None  # gateway called...
    # ...and the process dies. A new instance sees the reservation in state "calling".
    fresh = Policy(policy.campaigns, policy.store, event_clock=True)
    again = fresh.on_decision(d, d.fire_at)
    assert again.send is None
    assert [(o.status, o.reason) for o in again.outcomes] == [("failed", "unknown_after_crash")]


def test_crash_before_the_gateway_call_is_evaluated_again_and_keeps_its_cap_slot() -> None:
    policy = make()
    d = decision("d1")
    assert policy.on_decision(d, d.fire_at).send is not None  # reserved, cap taken, no call
    fresh = Policy(policy.campaigns, policy.store, event_clock=True)
    step = fresh.on_decision(d, d.fire_at)
    assert step.send is not None  # its own cap reservation does not block it
    send_ok(fresh, step)


def test_superseded_attempt_does_not_call_the_gateway() -> None:
    policy = make()
    d = decision("d1")
    old = policy.on_decision(d, d.fire_at)
    new = Policy(policy.campaigns, policy.store, event_clock=True).on_decision(d, d.fire_at)
    assert old.send is not None and new.send is not None
    assert policy.begin_call(old.send) == Step()  # lost: the newer attempt owns the decision
    assert policy.begin_call(new.send) is None


# --------------------------------------------------------------------------- caps


def test_default_cap_is_one_per_cooldown_with_exact_window_edge() -> None:
    policy = make()  # no top-level caps: cooldown 4h as a global 1/4h
    t0 = ms("2024-03-13T17:00:00Z")
    send_ok(policy, policy.on_decision(decision("d1", at="2024-03-13T17:00:00Z"), t0))
    early = policy.on_decision(decision("d2", campaign="promo"), t0 + 4 * H - 1)
    assert [(o.status, o.reason, o.rule) for o in early.outcomes] == [
        ("suppressed", "frequency_cap", "global:1/4h")
    ]
    edge = policy.on_decision(decision("d3", campaign="promo"), t0 + 4 * H)
    assert edge.send is not None


def test_global_and_campaign_caps() -> None:
    cs = campaigns(caps=[{"max": 2, "per": "1d"}], cart={"caps": [{"max": 1, "per": "72h"}]})
    policy = make(cs)
    t0 = ms("2024-03-13T17:00:00Z")
    send_ok(policy, policy.on_decision(decision("c1"), t0))
    cart2 = policy.on_decision(decision("c2"), t0 + H)
    assert [(o.reason, o.rule) for o in cart2.outcomes] == [("frequency_cap", "cart:1/3d")]
    send_ok(policy, policy.on_decision(decision("p1", campaign="promo"), t0 + H))
    promo2 = policy.on_decision(decision("p2", campaign="promo"), t0 + 2 * H)
    assert [(o.reason, o.rule) for o in promo2.outcomes] == [("frequency_cap", "global:2/1d")]


def test_out_of_order_replay_still_holds_the_cap() -> None:
    policy = make()
    late = ms("2024-03-13T18:00:00Z")
    send_ok(policy, policy.on_decision(decision("d1"), late))
    # An earlier decision processed later: the send recorded after it still counts.
    early = policy.on_decision(decision("d0"), late - H)
    assert [o.reason for o in early.outcomes] == ["frequency_cap"]


# --------------------------------------------------------------------------- quiet hours


def test_quiet_hours_los_angeles_defer_across_midnight() -> None:
    policy = make()
    # 2024-03-13 22:30 PDT (UTC-7) -> deferred to 09:00 PDT on the 14th = 16:00Z.
    d = decision("d1", at="2024-03-14T05:30:00Z")
    step = policy.on_decision(d, d.fire_at)
    assert step.send is None
    [deferred] = step.outcomes
    assert (deferred.status, deferred.reason, deferred.due_at) == (
        "deferred", "quiet_hours", ms("2024-03-14T16:00:00Z")
    )  # fmt: skip
    assert policy.release_due(ms("2024-03-14T15:59:59Z")) == []
    [due] = policy.release_due(ms("2024-03-14T16:00:00Z"))
    assert due.send is not None and due.send.now_ms == ms("2024-03-14T16:00:00Z")
    assert send_ok(policy, due).at == ms("2024-03-14T16:00:00Z")


def test_quiet_hours_kolkata_after_midnight() -> None:
    policy = make()
    # 01:00 IST (UTC+5:30) on the 14th = 19:30Z on the 13th -> 09:00 IST = 03:30Z on the 14th.
    d = decision("d1", user="u-ravi", at="2024-03-13T19:30:00Z")
    [deferred] = policy.on_decision(d, d.fire_at).outcomes
    assert deferred.due_at == ms("2024-03-14T03:30:00Z")
    # The same instant is daytime in Los Angeles (12:30 PDT): sent at once.
    assert policy.on_decision(decision("d2"), d.fire_at).send is not None


def test_quiet_hours_drop_and_campaign_override() -> None:
    cs = campaigns(quiet_hours={"from": "21:00", "to": "08:00", "action": "drop"},
                   promo={"quiet_hours": {"from": "22:00", "to": "07:00"}})  # fmt: skip
    policy = make(cs)
    at = "2024-03-14T04:30:00Z"  # 21:30 PDT: quiet for the file (drop), not for promo (22:00)
    dropped = policy.on_decision(decision("d1", at=at), ms(at))
    assert [(o.status, o.reason) for o in dropped.outcomes] == [("suppressed", "quiet_hours")]
    assert policy.on_decision(decision("d2", campaign="promo", at=at), ms(at)).send is not None


def test_deferral_past_max_defer_is_stale() -> None:
    cs = campaigns(cart={"max_defer": "2h"})
    policy = make(cs)
    d = decision("d1", at="2024-03-14T05:30:00Z")  # 22:30 PDT, quiet until 09:00: 10.5h away
    assert [(o.status, o.reason) for o in policy.on_decision(d, d.fire_at).outcomes] == [
        ("suppressed", "stale")
    ]


def test_deferred_send_is_rechecked_when_due() -> None:
    policy = make()
    d = decision("d1", at="2024-03-14T05:30:00Z")
    policy.on_decision(d, d.fire_at)
    # Meanwhile the contact opts out.
    policy.store.contacts["u-ana"] = Contact("u-ana", ANA.phone, "opted_out")  # type: ignore[attr-defined]
    [due] = policy.release_due(None)
    assert [(o.status, o.reason) for o in due.outcomes] == [("suppressed", "opted_out")]


# --------------------------------------------------------------------------- cancellations


def test_cancel_of_a_deferred_send() -> None:
    policy = make()
    d = decision("d1", at="2024-03-14T05:30:00Z")
    policy.on_decision(d, d.fire_at)
    cancel = DecisionCancelled("d1", "cart", "u-ana", "converted", ms("2024-03-14T06:00:00Z"))
    step = policy.on_cancel(cancel, cancel.at)
    assert [(o.status, o.reason, o.at) for o in step.outcomes] == [
        ("cancelled", "converted", cancel.at)
    ]
    assert policy.release_due(None) == []


def test_event_clock_conversion_later_than_the_send_does_not_cancel_it() -> None:
    """Replays: the cancel record may be read before the decision, but the purchase happened
    after the text was due (and after a deferred text went out): the text stays sent."""
    policy = make()
    later = DecisionCancelled("d1", "cart", "u-ana", "converted", ms("2024-03-14T17:00:00Z"))
    assert policy.on_cancel(later, later.at).outcomes == []
    outcome = send_ok(policy, policy.on_decision(decision("d1"), ms("2024-03-13T18:00:00Z")))
    assert outcome.status == "sent"
    # deferred to 09:00 LA (16:00Z), converted at 17:00Z: it went out at 16:00Z
    d = decision("d2", at="2024-03-14T05:30:00Z")
    assert policy.on_decision(d, d.fire_at).outcomes[0].status == "deferred"
    late = DecisionCancelled("d2", "cart", "u-ana", "converted", ms("2024-03-14T17:00:00Z"))
    assert policy.on_cancel(late, late.at).outcomes == []
    (due,) = policy.release_due(None)
    assert send_ok(policy, due).status == "sent"


def test_live_clock_cancel_read_before_a_late_decision_still_drops_it() -> None:
    store = InMemoryStore(contacts={ANA.user_id: ANA})
    policy = Policy(campaigns(), store, event_clock=False)
    # the purchase (19:00) came after the text was due (18:00) but before we got to it (19:30)
    later = DecisionCancelled("d1", "cart", "u-ana", "converted", ms("2024-03-14T19:00:00Z"))
    policy.on_cancel(later, later.at)
    step = policy.on_decision(decision("d1", at="2024-03-14T18:00:00Z"), ms("2024-03-14T19:30:00Z"))
    assert [(o.status, o.reason) for o in step.outcomes] == [("cancelled", "converted")]


def test_cancel_before_the_decision_and_before_the_call() -> None:
    policy = make()
    cancel = DecisionCancelled("d1", "cart", "u-ana", "converted", ms("2024-03-13T17:59:00Z"))
    assert policy.on_cancel(cancel, cancel.at).outcomes == []  # nothing to drop yet
    step = policy.on_decision(decision("d1"), ms("2024-03-13T18:00:00Z"))
    assert [(o.status, o.reason) for o in step.outcomes] == [("cancelled", "converted")]
    # A cancel that arrives after approval but before the gateway call still wins.
    step = policy.on_decision(decision("d2", campaign="promo"), ms("2024-03-13T18:00:00Z"))
    assert step.send is not None
    policy.on_cancel(DecisionCancelled("d2", "promo", "u-ana", "converted", 0), 0)
    gate = policy.begin_call(step.send)
    assert gate is not None and [(o.status, o.reason) for o in gate.outcomes] == [
        ("cancelled", "converted")
    ]


# --------------------------------------------------------------------------- gateway errors


def plan_for(policy: Policy) -> SendPlan:
    step = policy.on_decision(decision("d1"), ms("2024-03-13T18:00:00Z"))
    assert step.send is not None
    return step.send


def test_retry_after_throttling_then_success() -> None:
    policy = make()
    plan = plan_for(policy)
    answers: list[Any] = [RetryableGatewayError("throttled"), RetryableGatewayError("timeout")]
    calls, sleeps = [], []

    def send(msg: Any) -> SendResult:
        calls.append(msg.decision_id)
        if answers:
            raise answers.pop(0)
        return SendResult("m-9", None, None, None)

    result = deliver(plan, send, RetryPolicy(attempts=5, base_s=0.5, max_s=8),
                     sleep=sleeps.append, rng=random.Random(1))  # fmt: skip
    assert isinstance(result, SendResult) and calls == ["d1"] * 3
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0  # exponential, jittered


def test_retries_exhausted_and_permanent_errors_fail_to_the_dlq() -> None:
    policy = make()
    plan = plan_for(policy)
    calls = []

    def throttled(msg: Any) -> SendResult:
        calls.append(1)
        raise RetryableGatewayError("throttled")

    result = deliver(plan, throttled, RetryPolicy(attempts=3), sleep=lambda s: None)
    assert isinstance(result, RetryableGatewayError) and len(calls) == 3

    def barred(msg: Any) -> SendResult:
        raise PermanentGatewayError("barred", status="7")

    calls.clear()
    result = deliver(plan, barred, RetryPolicy(attempts=3), sleep=lambda s: None)
    assert isinstance(result, PermanentGatewayError)
    assert policy.begin_call(plan) is None
    step = policy.complete(plan, result, plan.now_ms)
    assert [(o.status, o.reason) for o in step.outcomes] == [("failed", "barred")]
    assert step.dead_letter == (plan.decision, "barred")
    # The failed text released its cap slot.
    assert policy.on_decision(decision("d2", campaign="promo"), plan.now_ms + 1).send is not None


# --------------------------------------------------------------------------- simulation


def test_simulate_dispatch_in_virtual_time() -> None:
    cs = campaigns(caps=[{"max": 1, "per": "4h"}])
    night = "2024-03-14T05:30:00Z"  # 22:30 in Los Angeles
    decisions = [
        decision("d-night", at=night),
        decision("d-morning", at="2024-03-14T16:30:00Z"),  # 09:30 PDT, 30 min after the deferral
        decision("d-out", user="u-out", at=night),
        decision("d-ravi", user="u-ravi", at="2024-03-14T06:00:00Z"),  # 11:30 IST
        decision("d-conv", user="u-ravi", at="2024-03-14T18:00:00Z"),  # 23:30 IST: deferred
    ]
    cancels = [
        DecisionCancelled("d-conv", "cart", "u-ravi", "converted", ms("2024-03-14T19:00:00Z"))
    ]
    sim = simulate(decisions, cancels, cs, [ANA, RAVI, OUT])
    final = {k: (o.status, o.reason) for k, o in sim.final().items()}
    assert final == {
        "d-night": ("sent", None),
        "d-morning": ("suppressed", "frequency_cap"),
        "d-out": ("suppressed", "opted_out"),
        "d-ravi": ("sent", None),
        "d-conv": ("cancelled", "converted"),
    }
    sent_at = {m.decision_id: m.sent_at_ms for m in sim.messages}
    assert sent_at == {"d-night": ms("2024-03-14T16:00:00Z"), "d-ravi": ms("2024-03-14T06:00:00Z")}
    assert [o.status for o in sim.outcomes if o.decision_id == "d-night"] == ["deferred", "sent"]
    assert simulate_dispatch(decisions, cancels, cs, [ANA, RAVI, OUT]) == sim.outcomes


# --------------------------------------------------------------------------- campaign file


def test_campaign_file_additions_are_parsed() -> None:
    cs = campaigns(
        caps=[{"max": 1, "per": "4h"}, {"max": 3, "per": "7d"}],
        quiet_hours={"from": "20:00", "to": "09:00", "action": "defer"},
        cart={"caps": [{"max": 1, "per": "72h"}], "quiet_hours": {"from": "21:00", "to": "08:00"},
              "max_defer": "6h", "max_segments": 3,
              "message": {"template": "Hi {{ first_name | default('x') }}", "footer": "STOP=end"}},
    )  # fmt: skip
    cart = cs.get("cart")
    assert cart is not None and cs.caps is not None
    assert [r.per_ms for r in cs.caps] == [4 * H, 7 * 24 * H]
    assert [(r.scope, r.max, r.per_ms) for r in cart.caps] == [("cart", 1, 72 * H)]
    assert cart.quiet_hours is not None and cart.quiet_hours.start.hour == 21
    assert (cart.max_defer_ms, cart.max_segments, cart.message.footer) == (6 * H, 3, "STOP=end")
    promo = cs.get("promo")
    assert promo is not None and promo.quiet_hours is None and promo.max_segments == 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"caps": [{"max": 0, "per": "1h"}]}, "campaign 'cart': caps: caps[0].max"),
        ({"quiet_hours": {"from": 2000}}, "campaign 'cart': quiet_hours"),
        ({"max_segments": 0}, "campaign 'cart': max_segments"),
        ({"max_defer": "soon"}, "campaign 'cart': max_defer"),
        ({"message": {"template": "Hi {{ nickname }}"}}, "variable(s) nickname may be missing"),
        ({"message": {"template": "x" * 300}}, "already needs 3 GSM-7 segments"),
        ({"message": {"template": "Hi {{ first_name"}}, "template syntax error"),
    ],
)
def test_campaign_file_errors_name_campaign_and_field(override: dict, needle: str) -> None:
    with pytest.raises(CampaignError, match=None) as info:
        campaigns(cart=override)
    assert needle in str(info.value)


def test_template_variables_guaranteed_by_the_trigger_need_no_default() -> None:
    trigger = {"type": "event", "event": "points", "where": {"tier": "gold"}}
    template = "{{ tier }} {{ first_name }} {{ properties }}"
    cs = campaigns(cart={"trigger": trigger, "message": {"template": template}})
    assert cs.get("cart") is not None
