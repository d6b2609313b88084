"""Last-touch attribution: windows, last touch, holdouts, revenue, clicks; the live shell on the
real broker and Redis."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from redis.cluster import RedisCluster

from processors.commands.attribution import Attributor
from processors.core.attribution import (
    AttributionError,
    Click,
    Conversion,
    Rules,
    Touch,
    UserState,
    attribute,
    attribute_all,
    revenue_of,
)
from processors.core.campaign import CampaignError, parse_campaigns
from processors.core.decision import Decision
from processors.core.events import ClickEvent
from processors.core.outcome import SmsOutcome
from processors.redis.client import Client
from processors.report.figures import compute
from processors.report.sources import load_kafka
from processors.settings import Settings
from schemas.codec import Codec

H = 3_600_000
D = 24 * H
T0 = 1_710_324_000_000  # 2024-03-13T10:00:00Z


def campaigns(**extra: dict[str, Any]) -> Any:
    base: dict[str, dict[str, Any]] = {
        "cart": {"trigger": {"type": "absence", "start": ["add_to_cart"], "cancel": ["purchase"],
                             "after": "30m"}},
        "form": {"trigger": {"type": "absence", "start": ["form_start"], "cancel": ["form_submit"],
                             "after": "20m"}},
        "loyal": {"trigger": {"type": "event", "event": "points_earned"}},
        "remind": {"trigger": {"type": "event", "event": "signup", "cancel": ["unsubscribe"]}},
    }  # fmt: skip
    for cid, fields in extra.items():
        base[cid] = {**base.get(cid, {"trigger": {"type": "event", "event": "x"}}), **fields}
    return parse_campaigns(
        {"campaigns": [{"id": cid, "message": {"template": "hi"}, **c} for cid, c in base.items()]}
    )


RULES = Rules(campaigns())


def sent(decision: str, campaign: str, at: int, user: str = "u1", **kw: Any) -> Touch:
    return Touch(decision, campaign, user, at, **kw)


def event(kind: str, ts: int, user: str = "u1", eid: str | None = None, **props: str) -> ClickEvent:
    return ClickEvent(eid or f"e-{kind}-{ts}", user, kind, ts, None, props)


def conv(e: ClickEvent, touches: list[Touch], clicks: tuple[Click, ...] = (), rules: Rules = RULES):
    return attribute(e, touches, clicks, rules)[0]


# ------------------------------------------------------------------ campaign fields


def test_conversion_defaults_to_cancel_events_else_purchase() -> None:
    cs = campaigns(loyal={"conversion": ["order_paid", "purchase"]})
    assert cs.get("cart").conversion_events == {"purchase"}  # type: ignore[union-attr]
    assert cs.get("form").conversion_events == {"form_submit"}  # type: ignore[union-attr]
    assert cs.get("remind").conversion_events == {"unsubscribe"}  # type: ignore[union-attr]
    assert cs.get("loyal").conversion_events == {"order_paid", "purchase"}  # type: ignore[union-attr]
    windows = cs.get("cart").attribution  # type: ignore[union-attr]
    assert (windows.after_send_ms, windows.after_click_ms) == (D, 5 * D)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"conversion": []}, "campaign 'loyal': conversion: must be an event type"),
        ({"attribution": {"after_send": "soon"}}, "campaign 'loyal': attribution.after_send:"),
        ({"attribution": {"after_click": "0s"}}, "attribution.after_click: must be greater than 0"),
        ({"attribution": {"after_sent": "1h"}}, "attribution: unknown field(s): after_sent"),
        ({"attribution": "24h"}, "campaign 'loyal': attribution: must be a mapping"),
    ],
)
def test_bad_conversion_fields_name_campaign_and_field(fields: dict, message: str) -> None:
    with pytest.raises(CampaignError) as err:
        campaigns(loyal=fields)
    assert message in str(err.value)


# ------------------------------------------------------------------ windows and last touch


def test_send_window_is_24h_inclusive_and_conversion_must_follow_the_text() -> None:
    touches = [sent("d1", "cart", T0)]
    inside = conv(event("purchase", T0 + D), touches)
    assert inside is not None and (inside.decision_id, inside.via) == ("d1", "send")
    assert inside.touch_at == T0 and inside.campaign_id == "cart"
    assert conv(event("purchase", T0 + D + 1), touches) is None
    assert conv(event("purchase", T0 - 1), touches) is None  # bought before the text
    assert conv(event("add_to_cart", T0 + H), touches) is None  # not a conversion type


def test_windows_are_configurable_per_campaign() -> None:
    rules = Rules(campaigns(cart={"attribution": {"after_send": "2h", "after_click": "1d"}}))
    touches = [sent("d1", "cart", T0)]
    assert conv(event("purchase", T0 + 2 * H), touches, rules=rules) is not None
    assert conv(event("purchase", T0 + 2 * H + 1), touches, rules=rules) is None
    click = Click("u1", T0 + 3 * H, "k1", "d1")
    via_click = conv(event("purchase", T0 + 3 * H + D), touches, (click,), rules)
    assert via_click is not None and via_click.via == "click"
    assert conv(event("purchase", T0 + 3 * H + D + 1), touches, (click,), rules) is None


def test_most_recent_covering_text_wins() -> None:
    touches = [
        sent("d-old", "loyal", T0),
        sent("d-new", "cart", T0 + 2 * H, variant="quick"),
        sent("d-form", "form", T0 + 3 * H),  # newer, but form converts on form_submit only
        sent("d-other-user", "cart", T0 + 4 * H, user="u2"),
    ]
    got = conv(event("purchase", T0 + 5 * H), touches)
    assert got is not None and (got.decision_id, got.variant) == ("d-new", "quick")
    submit = conv(event("form_submit", T0 + 5 * H), touches)
    assert submit is not None and submit.decision_id == "d-form"
    # after every window has passed, nothing covers it
    assert conv(event("purchase", T0 + 2 * H + D + 1), touches) is None


def test_last_touch_is_order_free_and_ties_break_on_decision_id() -> None:
    touches = [sent("d-a", "cart", T0), sent("d-b", "loyal", T0), sent("d-0", "cart", T0 - H)]
    for _ in range(5):
        random.shuffle(touches)
        got = conv(event("purchase", T0 + H), touches)
        assert got is not None and got.decision_id == "d-b"


def test_holdout_members_are_attributed_against_their_suppressed_decision() -> None:
    held = SmsOutcome("d-h", "cart", "u1", "suppressed", T0, reason="holdout", variant="v1")
    other = SmsOutcome("d-x", "cart", "u1", "suppressed", T0, reason="opted_out")
    touch = Touch.from_outcome(held)
    assert touch == Touch("d-h", "cart", "u1", T0, "v1", holdout=True)
    assert Touch.from_outcome(other) is None  # only sent texts and holdouts are touches
    got = conv(event("purchase", T0 + H, value="10"), [touch])
    assert got is not None and got.holdout and got.variant == "v1" and got.revenue == "10"
    assert conv(event("purchase", T0 + D + 1), [touch]) is None  # same 24 h window


def test_revenue_comes_from_the_value_property() -> None:
    assert revenue_of(event("purchase", T0, value="19.90")) == ("19.90", False)
    assert revenue_of(event("purchase", T0, value=" 1E+2 ")) == ("100", False)
    assert revenue_of(event("purchase", T0)) == (None, False)
    for bad in ("abc", "NaN", "-5", "Infinity"):
        assert revenue_of(event("purchase", T0, value=bad)) == (None, True)
    conversion, bad_value = attribute(
        event("purchase", T0 + H, value="twelve"), [sent("d1", "cart", T0)], (), RULES
    )
    assert conversion is not None and conversion.revenue is None and bad_value


def test_a_click_extends_the_window_to_5_days_after_the_click() -> None:
    touches = [sent("d1", "cart", T0)]
    late = event("purchase", T0 + 3 * D)
    assert conv(late, touches) is None
    clicked = conv(late, touches, (Click("u1", T0 + 2 * D, "k1", "d1"),))
    assert clicked is not None and (clicked.decision_id, clicked.via) == ("d1", "click")
    # a click without a decision id counts for the user's most recent text before it
    anon = conv(late, touches, (Click("u1", T0 + 2 * D, "k1"),))
    assert anon is not None and anon.via == "click"
    # clicks after the purchase, on another text, or too long ago do not count
    assert conv(late, touches, (Click("u1", T0 + 3 * D + 1, "k1", "d1"),)) is None
    assert conv(late, touches, (Click("u1", T0 + 2 * D, "k1", "d9"),)) is None
    assert conv(event("purchase", T0 + 5 * D + H + 1), touches, (Click("u1", T0 + H, "k"),)) is None
    # a click keeps an older text eligible, but a newer covering text still wins
    both = [*touches, sent("d2", "loyal", T0 + 2 * D + H)]
    got = conv(late, both, (Click("u1", T0 + 2 * D, "k1", "d1"),))
    assert got is not None and got.decision_id == "d2" and got.via == "send"


def test_attribute_all_counts_clicks_and_dedupes_events() -> None:
    touches = [sent("d1", "cart", T0), sent("d2", "cart", T0, user="u2")]
    events = [
        event("sms_link_click", T0 + H, eid="k1", decision_id="d1"),
        event("sms_link_click", T0 + 2 * H, eid="k2"),
        event("purchase", T0 + 3 * H, eid="p1", value="5"),
        event("purchase", T0 + 3 * H, eid="p1", value="5"),  # the same event twice
        event("purchase", T0 + 4 * H, user="u2", eid="p2", value="x"),
        event("purchase", T0 + 5 * H, user="u3", eid="p3"),
    ]
    result = attribute_all(events, touches, RULES)
    assert result.clicks == {"d1": 2}
    assert [(c.event_id, c.decision_id, c.revenue) for c in result.conversions] == [
        ("p1", "d1", "5"),
        ("p2", "d2", None),
    ]
    assert result.conversion_events == 3 and result.bad_values == 1


# ------------------------------------------------------------------ streaming state


def test_user_state_waits_for_the_settle_delay_and_matches_batch() -> None:
    rng = random.Random(7)
    touches = [sent(f"d{i}", rng.choice(["cart", "loyal", "form"]), T0 + rng.randrange(4 * D))
               for i in range(12)]  # fmt: skip
    clicks = [Click("u1", T0 + rng.randrange(4 * D), f"k{i}") for i in range(4)]
    events = [event(rng.choice(["purchase", "form_submit"]), T0 + rng.randrange(6 * D),
                    eid=f"p{i}", value=str(i)) for i in range(30)]  # fmt: skip
    state = UserState()
    items: list[Any] = [*touches, *clicks, *events]
    rng.shuffle(items)  # arrival order differs from event time
    for item in items:
        if isinstance(item, Touch):
            state.add_touch(item)
        elif isinstance(item, Click):
            state.add_click(item)
        else:
            assert state.add_conversion_event(item, item.ts + 60_000)
    first = min(e.ts for e in events)
    assert state.next_due() == first + 60_000
    early, _ = state.settle(first + 59_999, RULES)
    assert early == [] and len(state.pending) == 30
    one, _ = state.settle(first + 60_000, RULES)
    assert len(state.pending) == 29
    rest, _ = state.settle(None, RULES)
    streamed = one + rest
    batch = attribute_all([*events, *(_click_event(c) for c in clicks)], touches, RULES)
    assert streamed == batch.conversions and len(streamed) > 5
    assert not state.add_conversion_event(events[0], 0)  # redelivered: already settled
    assert state.unsent == streamed
    state.mark_produced({c.conversion_id for c in streamed[:3]})
    assert state.unsent == streamed[3:]
    again = UserState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state


def _click_event(c: Click) -> ClickEvent:
    return ClickEvent(c.event_id, c.user_id, "sms_link_click", c.ts, None, {})


def test_prune_forgets_old_touches_and_malformed_state_is_a_typed_error() -> None:
    state = UserState()
    state.add_touch(sent("d-old", "cart", T0))
    state.add_touch(sent("d-new", "cart", T0 + 10 * D))
    state.add_click(Click("u1", T0, "k-old"))
    state.prune(T0 + 10 * D, 7 * D, RULES)
    assert [t.decision_id for t in state.touches] == ["d-new"] and state.clicks == []
    with pytest.raises(AttributionError):
        UserState.from_json({"touches": [{"decision_id": "d"}]})
    with pytest.raises(AttributionError):
        Conversion.from_record({"conversion_id": "c"})


def test_conversion_record_round_trips_through_avro() -> None:
    c = conv(event("purchase", T0 + H, value="9.99"), [sent("d1", "cart", T0, variant="v")])
    assert c is not None
    codec = Codec(f"mock://{uuid.uuid4().hex}")
    name, rec = codec.decode(codec.encode("Conversion", c.to_record()))
    assert name == "Conversion" and Conversion.from_record(rec) == c
    assert Conversion.from_record(c.to_json()) == c  # conversions.jsonl lines read back


# ------------------------------------------------------------------ the live shell


def _produce(settings: Settings, codec: Codec, items: list[tuple[str, str, dict]]) -> None:
    producer = Producer(settings.kafka_common())
    for topic, name, rec in items:
        producer.produce(topic, key=rec["user_id"], value=codec.encode(name, rec))
    assert producer.flush(10) == 0


def test_live_shell_attributes_from_the_topics_with_state_in_redis(
    settings: Settings, any_redis: Client
) -> None:
    """On a single Redis and on a Redis Cluster (a user's state and due entry share a slot)."""
    codec = Codec(settings.schema_registry_url)
    now = int(time.time() * 1000)
    cs = campaigns(cart={"holdout": "0%"})
    o = settings.topic_outcomes
    c = settings.topic_clickstream

    def outcome(d: str, user: str, status: str, at: int, reason: str | None = None) -> tuple:
        rec = SmsOutcome(d, "cart", user, status, at, reason=reason, variant="v1").to_record()
        return (o, "SmsOutcome", rec)

    def click(eid: str, user: str, kind: str, ts: int, **props: str) -> tuple:
        return (c, "ClickEvent", ClickEvent(eid, user, kind, ts, None, props).to_record())

    prefix = f"t{uuid.uuid4().hex[:6]}:"
    service = Attributor(settings, cs, redis_client=any_redis, key_prefix=prefix,
                         group_id=f"attr-{uuid.uuid4().hex[:8]}", settle_s=0.5)  # fmt: skip
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        # the purchase arrives before the outcome of the text it belongs to: settling waits
        _produce(settings, codec, [
            click("p-ana", "u-ana", "purchase", now - 60_000, value="42.50"),
            click("p-ana", "u-ana", "purchase", now - 60_000, value="42.50"),  # redelivered
            click("x-ana", "u-ana", "page_view", now - 50_000),
            click("k-cy", "u-cy", "sms_link_click", now - 3 * D, decision_id="d-cy"),
            click("p-cy", "u-cy", "purchase", now - 2 * D),
            click("p-dan", "u-dan", "purchase", now - 1000),
        ])  # fmt: skip
        _produce(settings, codec, [
            outcome("d-ana", "u-ana", "sent", now - H),
            outcome("d-ben", "u-ben", "suppressed", now - H, "holdout"),
            outcome("d-cy", "u-cy", "sent", now - 4 * D),
            outcome("d-dan", "u-dan", "suppressed", now - H, "opted_out"),
        ])  # fmt: skip
        time.sleep(0.2)
        _produce(settings, codec, [click("p-ben", "u-ben", "purchase", now, value="7")])
        got = _read_conversions(settings, codec, 3, timeout_s=25)
    finally:
        service.stop()
        thread.join(15)
    assert service.error is None
    assert {(x.user_id, x.decision_id, x.via, x.holdout, x.revenue) for x in got} == {
        ("u-ana", "d-ana", "send", False, "42.50"),
        ("u-ben", "d-ben", "send", True, "7"),
        ("u-cy", "d-cy", "click", False, None),
    }
    assert len(got) == 3  # the redelivered purchase was not counted twice
    assert service.stats.unattributed == 1  # u-dan's text was never sent
    assert any_redis.exists(service.state_key("u-ana"))
    if isinstance(any_redis, RedisCluster):
        slot = any_redis.keyslot
        assert slot(service.state_key("u-ana")) == slot(service.due_key("u-ana"))
    else:  # the names a single Redis always had
        assert service.state_key("u-ana") == f"{prefix}attr:u:u-ana"
        assert service.due_keys == [f"{prefix}attr:due"]
    assert sum(any_redis.zcard(k) for k in service.due_keys) == 0  # nothing pending/unsent

    # `nudgeflow report --from-kafka` reads the same topics back
    _produce(settings, codec, [
        (settings.topic_decisions, "TriggerDecision",
         Decision(d, "cart", u, now - 5 * D, ("t",), now - 5 * D, variant="v1").to_record())
        for d, u in (("d-ana", "u-ana"), ("d-ben", "u-ben"), ("d-cy", "u-cy"), ("d-dan", "u-dan"))
    ])  # fmt: skip
    data = compute(load_kafka(settings))
    assert [(r["campaign_id"], r["variant"]) for r in data["rows"]] == [("cart", "v1")]
    row = data["rows"][0]
    assert (row["decisions"], row["sent"], row["holdout"], row["clicked"]) == (4, 2, 1, 1)
    assert (row["converted"], row["holdout_converted"], row["revenue"]) == (2, 1, "42.50")
    assert row["suppressed"] == {"holdout": 1, "opted_out": 1}
    assert row["median_trigger_to_send_s"] == ((5 * D - H) + D) / 2 / 1000  # d-ana, d-cy


def _read_conversions(settings: Settings, codec: Codec, n: int, timeout_s: float) -> list:
    consumer = Consumer({**settings.kafka_common(), "group.id": f"r-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                         "heartbeat.interval.ms": 1000})  # fmt: skip
    consumer.subscribe([settings.topic_conversions])
    got: list[Conversion] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=0.5):
                if msg.error() is None:
                    got.append(Conversion.from_record(codec.decode_as("Conversion", msg.value())))
            if len(got) >= n:
                time.sleep(1.0)  # anything extra (a duplicate) would show up now
                extra = consumer.consume(100, timeout=0.5)
                got += [
                    Conversion.from_record(codec.decode_as("Conversion", m.value()))
                    for m in extra
                    if m.error() is None
                ]
                break
    finally:
        consumer.close()
    return got
