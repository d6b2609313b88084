"""The webhook service (processors/webhooks.py) and its pure helpers.

Integration tests drive it with real HTTP requests in Vonage's formats (form, JSON and query;
signed with the vonage SDK's own signer, and unsigned), against the session's real redis-server
and Apache Kafka, with the real dispatcher sending through the real vonage SDK to the local
HTTPS fake (tests/fakes/vonage_fake.py). Tests on ``any_wsettings`` or ``any_redis`` run on a
single Redis and on a local Redis Cluster.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydantic import SecretStr

from processors.commands.contacts import import_contacts
from processors.core import receipts
from processors.core.campaign import parse_campaigns
from processors.core.contact import Contact
from processors.core.links import (
    LinkShortener,
    LinkTarget,
    find_urls,
    is_valid_code,
    make_code,
    replace_urls,
)
from processors.core.policy import Policy, RetryPolicy
from processors.dispatcher import make_gateway
from processors.redis import RedisStore
from processors.redis.client import Client
from processors.settings import Settings
from processors.webhooks import (
    DELIVERY_PATH,
    INBOUND_PATH,
    BackgroundServer,
    SignatureError,
    SignatureVerifier,
    WebhookError,
    WebhookService,
    apply_inbound,
    ensure_topics,
    parse_inbound,
    parse_receipt,
    reply_client_ref,
    sign_params,
)
from schemas.codec import Codec
from tests.fakes.vonage_fake import VonageFake
from tests.integration.test_dispatcher import (
    Bus,
    Reader,
    campaign_doc,
    decision,
    running,
    write_jsonl,
)

SECRET = "webhook-signing-secret"
ANA, BEN = "+14155550100", "+12125550101"
STOP_TEXT = "Stopped. Reply START to resubscribe."
START_TEXT = "Welcome back. Reply STOP to opt out."
HELP_TEXT = "Shop alerts. Reply STOP to opt out."
FAST_RETRY = RetryPolicy(attempts=3, base_s=0.05, max_s=0.1)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("method", ["md5hash", "md5", "sha1", "sha256", "sha512"])
def test_signatures_verify_and_forgeries_fail(method: str) -> None:
    params = {"msisdn": "447700900001", "to": "447700900000", "messageId": "m1",
              "text": "STOP & go=now", "type": "text"}  # fmt: skip
    signed = sign_params(params, SECRET, method)
    verifier = SignatureVerifier(SECRET, method, tolerance_s=300)
    verifier.verify(signed, time.time())  # no exception
    for forged in (
        {**signed, "text": "START"},  # tampered field
        {**signed, "sig": "0" * len(signed["sig"])},
        {**signed, "extra": "1"},
        sign_params(params, "not-the-secret", method),
    ):
        with pytest.raises(SignatureError) as err:
            verifier.verify(forged, time.time())
        assert err.value.reason == "bad_signature"
    unsigned = {k: v for k, v in signed.items() if k != "sig"}
    with pytest.raises(SignatureError, match="not signed"):
        verifier.verify(unsigned, time.time())
    with pytest.raises(SignatureError) as stale:
        verifier.verify(signed, time.time() + 301)
    assert stale.value.reason == "stale"


def test_md5hash_is_vonage_legacy_form() -> None:
    """MD5 of the sorted ``&k=v`` string (``&``/``=`` in values replaced by ``_``) + secret."""
    import hashlib

    signed = sign_params({"b": "x&y", "a": "1=2", "timestamp": "1700000000", "nonce": "n"},
                         "s3cret", "md5hash")  # fmt: skip
    expected = hashlib.md5(b"&a=1_2&b=x_y&nonce=n&timestamp=1700000000s3cret").hexdigest()
    assert signed["sig"] == expected


def test_bad_fields_are_400_and_bad_timestamps_401() -> None:
    message = parse_inbound(inbound(ANA, "Hi there"))
    assert (message.phone, message.keyword, message.keyword_part) == (ANA, "HI", True)
    for bad in (
        {"msisdn": "abc"},
        {"msisdn": "+0123"},
        {"concat-part": "²"},  # str.isdigit() says yes, int() says no
        {"concat-part": "3", "concat-total": "2"},
        {"type": "mms"},
        {"message-timestamp": "yesterday"},
        {"messageId": ""},
    ):
        with pytest.raises(WebhookError) as err:
            parse_inbound({**inbound(ANA, "Hi"), **bad})
        assert err.value.status == 400, bad
    assert parse_receipt(receipt("M1", "DELIVRD", "d-1")).status == "unknown"
    for bad in ({"scts": "١٢٣٤٥٦٧٨٩٠"}, {"price": "cheap"}, {"messageId": " "}):
        with pytest.raises(WebhookError) as err:
            parse_receipt({**receipt("M1", "delivered", "d-1"), **bad})
        assert err.value.status == 400, bad
    verifier = SignatureVerifier(SECRET)
    for ts in ("١٧٠٠٠٠٠٠٠٠", "17e8", ""):
        with pytest.raises(SignatureError):
            verifier.verify({"a": "1", "timestamp": ts, "sig": "x"}, time.time())


@pytest.mark.parametrize(
    ("parts", "expected", "status", "final"),
    [
        ({"a": "delivered"}, 1, "delivered", True),
        ({"a": "delivered"}, 2, "accepted", False),  # part 2 not heard of yet
        ({"a": "delivered", "b": "buffered"}, 2, "buffered", False),
        ({"a": "delivered", "b": "delivered"}, 2, "delivered", True),
        ({"a": "delivered", "b": "expired"}, 2, "expired", True),
        ({"a": "failed", "b": "rejected"}, 2, "rejected", True),  # the worst failure wins
        ({"a": "failed"}, 3, "failed", True),  # one failed part fails the text at once
        ({"a": "delivered", "b": "unknown"}, 2, "unknown", True),
        ({"a": "accepted"}, 1, "accepted", False),
    ],
)
def test_multipart_receipts_fold_into_one_state(
    parts: dict[str, str], expected: int, status: str, final: bool
) -> None:
    folded = receipts.fold(parts, expected)
    assert (folded.status, folded.final) == (status, final)
    assert folded.delivered_parts == sum(s == "delivered" for s in parts.values())


def test_receipt_fields() -> None:
    assert receipts.merge_part("delivered", "accepted") == "delivered"  # final is sticky
    assert receipts.merge_part("accepted", "delivered") == "delivered"
    assert receipts.normalize_status("DELIVRD") == "unknown"
    assert receipts.normalize_status("Delivered") == "delivered"
    assert receipts.parse_scts("2001011400") == int(
        datetime(2020, 1, 1, 14, tzinfo=UTC).timestamp() * 1000
    )
    assert receipts.parse_message_timestamp("2020-01-01 12:00:00") == 1577880000000
    assert receipts.sum_prices(["0.0333", "0.0333"]) == "0.0666"
    assert receipts.sum_prices(["0.0333", None]) is None
    with pytest.raises(receipts.ReceiptError):
        receipts.parse_scts("20010114")


def test_urls_are_found_without_trailing_punctuation() -> None:
    text = "Cart: https://shop.example/c/42?x=1&y=2. Also (see http://a.io/b_(c)) or https:// x"
    assert [s.url for s in find_urls(text)] == [
        "https://shop.example/c/42?x=1&y=2",
        "http://a.io/b_(c)",
    ]
    assert replace_urls(text, lambda u: "<L>") == "Cart: <L>. Also (see <L>) or https:// x"


class DictLinks:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, str]] = {}

    def put_link(self, code: str, record: Any, ttl_ms: int) -> dict[str, str]:
        return self.data.setdefault(code, dict(record))


def test_short_codes_are_stable_per_decision_and_url_and_collisions_move_on() -> None:
    a = make_code("d-1", "https://x.io/a", secret=b"k")
    assert a == make_code("d-1", "https://x.io/a", secret=b"k") and is_valid_code(a)
    assert a != make_code("d-2", "https://x.io/a", secret=b"k")
    assert a != make_code("d-1", "https://x.io/a", secret=b"other")
    store = DictLinks()
    short = LinkShortener(store, "https://t.example/", ttl_ms=1000, secret=b"k")
    text = short.shorten("Go https://x.io/a now", decision_id="d-1", campaign_id="c", user_id="u")
    assert text == f"Go https://t.example/l/{a} now"
    # an already-taken code (another decision) is skipped deterministically
    other = LinkTarget("https://y.io", "d-9", "c", "u9").to_record()
    store2 = DictLinks()
    store2.data[a] = other
    moved = LinkShortener(store2, "https://t.example", 1000, b"k").shorten(
        "Go https://x.io/a now", decision_id="d-1", campaign_id="c", user_id="u"
    )
    assert a not in moved and store2.data[a] == other
    assert not is_valid_code("../etc") and not is_valid_code("a")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[VonageFake]:
    with VonageFake() as f:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", f.ca_path)
        yield f


@pytest.fixture
def wsettings(settings: Settings, fake: VonageFake, redis_client: redis.Redis) -> Settings:
    """Per-test topics (incl. sms-delivery/sms-inbound), clean Redis, gateway -> the fake."""
    s = settings.model_copy(
        update={
            "clock": "event",
            "gateway": "vonage",
            "vonage_rest_host": fake.host,
            "vonage_api_key": SecretStr(fake.api_key),
            "vonage_api_secret": SecretStr(fake.api_secret),
            "vonage_timeout_s": 1.0,
            "webhook_signature_secret": SecretStr(SECRET),
            "webhook_signature_method": "sha256",
            "help_text": HELP_TEXT,
            "stop_confirmation_text": STOP_TEXT,
            "start_confirmation_text": START_TEXT,
            "webhook_max_body_bytes": 4096,
        }
    )
    ensure_topics(s, [s.topic_delivery, s.topic_inbound])
    return s


@pytest.fixture
def any_wsettings(wsettings: Settings, any_redis_url: str, any_redis: Client) -> Settings:
    """:func:`wsettings` on a single Redis, then on a Redis Cluster (emptied around the test)."""
    return wsettings.model_copy(update={"redis_url": any_redis_url})


def contacts(tmp_path: Path, settings: Settings) -> None:
    rows = [
        {"user_id": "u-ana", "phone": ANA, "consent": "opted_in",
         "timezone": "America/Los_Angeles", "first_name": "Ana"},
        {"user_id": "u-ben", "phone": BEN, "consent": "opted_in",
         "timezone": "America/New_York", "first_name": "Ben"},
    ]  # fmt: skip
    assert import_contacts(write_jsonl(tmp_path / "contacts.jsonl", rows), settings) == (2, 0)


def serve(settings: Settings, **kw: Any) -> BackgroundServer:
    service = WebhookService(settings, make_gateway(settings), retry=FAST_RETRY, **kw)
    return BackgroundServer(service).start()


def vonage_now(offset_s: int = 0) -> str:
    return datetime.fromtimestamp(time.time() + offset_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def inbound(phone: str, text: str, message_id: str | None = None, **extra: str) -> dict[str, str]:
    """An inbound-SMS webhook as Vonage sends it (msisdn without the +)."""
    return {
        "msisdn": phone.removeprefix("+"),
        "to": "12015550199",
        "messageId": message_id or uuid.uuid4().hex[:16].upper(),
        "text": text,
        "type": "text",
        "keyword": text.split()[0].upper() if text.split() else "",
        "message-timestamp": vonage_now(),
        "api-key": "fakekey1",
        **extra,
    }


def receipt(message_id: str, status: str, client_ref: str | None, **extra: str) -> dict[str, str]:
    params = {
        "msisdn": "14155550100",
        "to": "NudgeFlow",
        "network-code": "310260",
        "messageId": message_id,
        "price": "0.03330000",
        "status": status,
        "scts": "2411270150",
        "err-code": "0",
        "api-key": "fakekey1",
        "message-timestamp": vonage_now(),
        **extra,
    }
    if client_ref is not None:
        params["client-ref"] = client_ref
    return params


def call(
    server: BackgroundServer,
    path: str,
    params: dict[str, str],
    *,
    how: str = "form",
    sign: bool = True,
) -> requests.Response:
    data = sign_params(params, SECRET, "sha256") if sign else params
    url = server.url + path
    if how == "get":
        return requests.get(url, params=data, timeout=10)
    if how == "json":
        return requests.post(url, json=data, timeout=10)
    return requests.post(url, data=data, timeout=10)


class Topic:
    """Everything on a topic from the beginning, with keys (no group)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.codec = Codec(settings.schema_registry_url)
        self.consumer = Consumer({**settings.kafka_common(), "group.id": f"t-{uuid.uuid4().hex}"})
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        self.items: list[tuple[str | None, str, dict[str, Any]]] = []

    def poll(self, timeout_s: float = 1.0) -> list[tuple[str | None, str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(100, timeout=0.1):
                if msg.error() is None and msg.value():
                    key = msg.key().decode() if msg.key() else None
                    name, record = self.codec.decode(msg.value())
                    self.items.append((key, name, record))
        return self.items

    def wait(self, done: Callable[[list[tuple[str | None, str, dict[str, Any]]]], bool],
             timeout_s: float = 15.0) -> list[tuple[str | None, str, dict[str, Any]]]:  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not done(self.items):
            assert time.monotonic() < deadline, f"timed out; saw {self.items}"
            self.poll(0.2)
        return self.items

    def close(self) -> None:
        self.consumer.close()


def sent_to(fake: VonageFake, phone: str) -> list[dict[str, str]]:
    return [r.fields for r in fake.requests if r.fields.get("to") == phone.removeprefix("+")]


def wait_until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def contacts_caught_up(settings: Settings, redis_client: Client, user: str) -> bool:
    """The dispatcher's stored profile of ``user`` is the last record of its partition."""
    offset = redis_client.hget(f"nudgeflow:{{{user}}}:contact", "o")
    consumer = Consumer({**settings.kafka_common(), "group.id": f"t-{uuid.uuid4().hex}"})
    try:
        meta = consumer.list_topics(settings.topic_contacts, timeout=10).topics
        highs = [
            consumer.get_watermark_offsets(TopicPartition(settings.topic_contacts, p), timeout=5)[1]
            for p in meta[settings.topic_contacts].partitions
        ]
    finally:
        consumer.close()
    return offset is not None and int(offset) + 1 in highs


# --------------------------------------------------------------------------- STOP / START / HELP


def test_stop_is_in_force_at_once_confirmed_once_and_start_resumes(
    any_wsettings: Settings, fake: VonageFake, tmp_path: Path, any_redis: Client
) -> None:
    settings = any_wsettings
    contacts(tmp_path, settings)
    store = RedisStore(any_redis)
    outcomes = Reader(settings, settings.topic_outcomes)
    profiles = Topic(settings, settings.topic_contacts)
    server = serve(settings)
    try:
        with running(settings, campaign_doc()):
            Bus(settings).send(decision("d-1", "u-ana", "2024-03-13T17:00:00Z"))
            assert outcomes.wait_final({"d-1"})["d-1"].status == "sent"
            assert len(sent_to(fake, ANA)) == 1

            stop = inbound(ANA, "Stop", message_id="MSG-STOP-1")
            assert call(server, INBOUND_PATH, stop).status_code == 200
            # In force for the dispatcher's store as soon as the webhook has answered.
            assert store.contact("u-ana").consent == "opted_out"
            assert store.phone_consent(ANA).status == "opted_out"
            # Vonage retries (the same message, also as JSON and GET): one confirmation only.
            for how in ("form", "json", "get"):
                assert call(server, INBOUND_PATH, stop, how=how).status_code == 200
            server.call(server.service.wait_replies())
            wait_until(lambda: len(sent_to(fake, ANA)) == 2)
            confirmation = sent_to(fake, ANA)[1]
            assert confirmation["text"] == STOP_TEXT
            assert confirmation["client-ref"] == reply_client_ref("MSG-STOP-1")

            # Later decisions: nothing leaves for Ana's number; Ben is unaffected.
            Bus(settings).send(
                decision("d-2", "u-ana", "2024-03-14T17:00:00Z"),
                decision("d-ben", "u-ben", "2024-03-14T17:00:00Z"),
            )
            final = outcomes.wait_final({"d-2", "d-ben"})
            assert (final["d-2"].status, final["d-2"].reason) == ("suppressed", "opted_out")
            assert final["d-ben"].status == "sent"
            time.sleep(0.5)  # a late retry of the STOP webhook must not send anything either
            assert call(server, INBOUND_PATH, stop).status_code == 200
            server.call(server.service.wait_replies())
            assert [f["client-ref"] for f in sent_to(fake, ANA)] == [
                "d-1",
                reply_client_ref("MSG-STOP-1"),
            ]
            # The profile update reached the contacts topic for the CRM and the dispatcher.
            profiles.wait(lambda items: any(
                k == "u-ana" and r["consent"]["status"] == "opted_out" for k, _n, r in items
            ))  # fmt: skip
            update = [r for k, _n, r in profiles.items if k == "u-ana"][-1]
            assert update["consent"]["source"] == "sms:STOP" and update["phone"] == ANA

            # START: opted back in with a confirmation, and texts resume.
            start = inbound(ANA, "start", message_id="MSG-START-1",
                            **{"message-timestamp": vonage_now(1)})  # fmt: skip
            assert call(server, INBOUND_PATH, start, how="get").status_code == 200
            assert store.contact("u-ana").consent == "opted_in"
            server.call(server.service.wait_replies())
            wait_until(lambda: len(sent_to(fake, ANA)) == 3)
            assert sent_to(fake, ANA)[2]["text"] == START_TEXT
            wait_until(lambda: contacts_caught_up(settings, any_redis, "u-ana"))
            Bus(settings).send(decision("d-3", "u-ana", "2024-03-15T17:00:00Z"))
            assert outcomes.wait_final({"d-3"})["d-3"].status == "sent"
            assert sent_to(fake, ANA)[3]["client-ref"] == "d-3"
    finally:
        server.stop()
        outcomes.close()
        profiles.close()


def test_stop_between_the_policy_check_and_the_gateway_call_cancels_the_text(
    any_redis: Client,
) -> None:
    """A send the policy approved just before the STOP never reaches the gateway."""
    store = RedisStore(any_redis)
    ana = Contact("u-ana", ANA, "opted_in", timezone="America/Los_Angeles")
    store.put_contact("u-ana", ana.to_record(), 1)
    store.index_phone("u-ana", ANA)
    policy = Policy(parse_campaigns(campaign_doc()), store)
    d = decision("d-race", "u-ana", "2024-03-13T17:00:00Z")
    step = policy.on_decision(d, d.fire_at)
    assert step.send is not None  # approved: consent, caps, quiet hours, rendering passed
    action = apply_inbound(store, "STOP", ANA, d.fire_at + 1)
    assert action.kind == "stop" and [c.consent for c in action.contacts] == ["opted_out"]
    # Even if an older opted_in profile lands meanwhile (the dispatcher catching up on the
    # contacts topic, or a re-import), the number's STOP holds.
    store.put_contact("u-ana", ana.to_record(), 2)
    assert store.contact("u-ana").consent == "opted_out"
    gate = policy.begin_call(step.send)  # what the dispatcher does right before the gateway
    assert gate is not None
    assert [(o.status, o.reason) for o in gate.outcomes] == [("cancelled", "opted_out")]


def test_an_unknown_number_stays_opted_out_when_a_profile_for_it_arrives_later(
    any_redis: Client,
) -> None:
    """A STOP from a number no profile has is kept by phone; a later import of a profile with
    that number (even one saying opted_in) cannot re-enable it, only a START from it can."""
    store = RedisStore(any_redis)
    action = apply_inbound(store, "unsubscribe", BEN, 1_000)
    assert (action.kind, action.user_ids, action.contacts) == ("stop", [], [])
    assert action.reply is not None  # the number still gets its one confirmation
    imported = Contact("u-new", BEN, "opted_in", consent_at_ms=5_000)
    store.put_contact("u-new", imported.to_record(), 7)
    assert store.contact("u-new").consent == "opted_out"
    # An older START (a delayed retry) does not lift a newer STOP; a newer one does.
    assert not apply_inbound(store, "START", BEN, 500).applied
    assert store.contact("u-new").consent == "opted_out"
    store.index_phone("u-new", BEN)
    action = apply_inbound(store, "Yes", BEN, 6_000)
    assert action.applied and [c.user_id for c in action.contacts] == ["u-new"]
    assert store.contact("u-new").consent == "opted_in"


def test_help_and_other_texts(
    wsettings: Settings, fake: VonageFake, tmp_path: Path, redis_client: redis.Redis
) -> None:
    contacts(tmp_path, wsettings)
    inbox = Topic(wsettings, wsettings.topic_inbound)
    server = serve(wsettings)
    try:
        help_msg = inbound(ANA, "help", message_id="MSG-HELP")
        for _ in range(2):
            assert call(server, INBOUND_PATH, help_msg, how="json").status_code == 200
        assert call(server, INBOUND_PATH, inbound(ANA, "Where is my order?", "MSG-Q")).ok
        assert call(server, INBOUND_PATH, inbound("+447700900123", "hi", "MSG-X")).ok
        # part 2 of a long text starting with STOP is forwarded, not a keyword
        part2 = inbound(BEN, "stop and more", "MSG-P2", concat="true", **{
            "concat-ref": "7", "concat-total": "2", "concat-part": "2"})  # fmt: skip
        assert call(server, INBOUND_PATH, part2).ok
        server.call(server.service.wait_replies())
        wait_until(lambda: len(fake.requests) >= 1)
        time.sleep(0.2)
        assert [(f["to"], f["text"]) for f in (r.fields for r in fake.requests)] == [
            ("14155550100", HELP_TEXT)
        ]
        items = inbox.wait(lambda items: len(items) >= 3)
        by_id = {r["message_id"]: (k, r) for k, _n, r in items}
        assert set(by_id) == {"MSG-Q", "MSG-X", "MSG-P2"}
        key, rec = by_id["MSG-Q"]
        assert (key, rec["user_id"], rec["msisdn"], rec["text"]) == (
            "u-ana", "u-ana", ANA, "Where is my order?")  # fmt: skip
        assert rec["keyword"] == "WHERE" and rec["message_timestamp"] > 0
        assert by_id["MSG-X"][0] is None and by_id["MSG-X"][1]["user_id"] is None
        assert by_id["MSG-P2"][1]["concat_part"] == 2
        assert RedisStore(redis_client).contact("u-ben").consent == "opted_in"
    finally:
        server.stop()
        inbox.close()


# --------------------------------------------------------------------------- request rules


def test_forged_stale_unsigned_oversized_and_malformed_requests_change_nothing(
    wsettings: Settings, fake: VonageFake, tmp_path: Path, redis_client: redis.Redis
) -> None:
    contacts(tmp_path, wsettings)
    store = RedisStore(redis_client)
    server = serve(wsettings)
    try:
        stop = inbound(ANA, "STOP", "MSG-FORGED")
        forged = {**sign_params(stop, "guessed-secret", "sha256")}
        tampered = {**sign_params(inbound(ANA, "hello", "MSG-FORGED"), SECRET), "text": "STOP"}
        stale = sign_params({**stop, "timestamp": str(int(time.time()) - 3600)}, SECRET)
        url = server.url + INBOUND_PATH
        answers = [
            requests.post(url, data=forged, timeout=10),
            requests.post(url, data=tampered, timeout=10),
            requests.get(url, params=stale, timeout=10),
            requests.post(url, data=stop, timeout=10),  # unsigned
            requests.post(
                server.url + DELIVERY_PATH, data=receipt("X1", "delivered", "d"), timeout=10
            ),  # fmt: skip
        ]
        assert [a.status_code for a in answers] == [401] * 5
        assert [a.json()["error"] for a in answers] == [
            "bad_signature", "bad_signature", "stale", "missing_signature", "missing_signature"
        ]  # fmt: skip
        assert store.contact("u-ana").consent == "opted_in"
        assert store.phone_consent(ANA) is None
        # the genuine message (same id) is still processed: the forgery claimed nothing
        assert call(server, INBOUND_PATH, stop).status_code == 200
        assert store.contact("u-ana").consent == "opted_out"

        huge = inbound(BEN, "STOP " + "x" * 5000, "MSG-HUGE")
        assert call(server, INBOUND_PATH, huge).status_code == 413
        assert requests.get(url, params={"text": "y" * 5000}, timeout=10).status_code == 413
        assert store.phone_consent(BEN) is None
        bad = [
            call(
                server,
                INBOUND_PATH,
                {k: v for k, v in inbound(BEN, "STOP").items() if k != "msisdn"},
            ),  # fmt: skip
            call(server, INBOUND_PATH, inbound("12", "STOP")),
            requests.post(
                url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10
            ),  # fmt: skip
            requests.post(url, data=b"\xff\xfe", timeout=10),
            call(server, DELIVERY_PATH, receipt("M1", "delivered", "d", scts="garbage")),
            call(
                server,
                DELIVERY_PATH,
                {k: v for k, v in receipt("M1", "x", None).items() if k != "status"},
            ),  # fmt: skip
        ]
        assert [b.status_code for b in bad] == [400, 400, 400, 400, 400, 400]
        xml = requests.post(url, data=b"<x/>", headers={"Content-Type": "text/xml"}, timeout=10)
        assert xml.status_code == 415
        assert store.phone_consent(BEN) is None

        health = requests.get(server.url + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["signed"] is True
        exposition = requests.get(server.url + "/metrics", timeout=10).text
        assert 'nudgeflow_webhook_signature_failures_total{endpoint="inbound"}' in exposition
        assert 'nudgeflow_webhook_signature_failures_total{endpoint="delivery"}' in exposition
    finally:
        server.stop()


# --------------------------------------------------------------------------- receipts and links


def test_receipts_fold_to_sms_delivery_and_link_clicks_reach_the_clickstream(
    any_wsettings: Settings, fake: VonageFake, tmp_path: Path
) -> None:
    contacts(tmp_path, any_wsettings)
    server = serve(any_wsettings)
    delivery = Topic(any_wsettings, any_wsettings.topic_delivery)
    clicks = Topic(any_wsettings, any_wsettings.topic_clickstream)
    # The dispatcher shortens URLs against the webhook service's address.
    settings = any_wsettings.model_copy(update={"link_base_url": server.url})
    long_copy = "Your basket is still here and we kept the sizes you picked. " * 2
    doc = campaign_doc(
        cart={"message": {"template": long_copy + "Finish: {{ link | default('') }}"}}
    )
    target = "https://shop.example/cart/42?utm_source=sms&utm_campaign=cart"
    outcomes = Reader(settings, settings.topic_outcomes)
    try:
        with running(settings, doc):
            Bus(settings).send(decision("d-link", "u-ana", "2024-03-13T17:00:00Z",
                                        properties={"link": target}))  # fmt: skip
            sent = outcomes.wait_final({"d-link"})["d-link"]
        assert sent.status == "sent" and sent.segments == 2
        text = sent_to(fake, ANA)[0]["text"]
        assert target not in text and f"{server.url}/l/" in text
        code = text.split("/l/")[1].split()[0]

        # Both parts' receipts (ids of the fake's 2-part answer), with retries.
        first = sent.message_id
        second = f"FAKE{int(first[4:], 16) + 1:012X}"
        steps = [
            (receipt(first, "delivered", "d-link"), "form"),
            (receipt(first, "delivered", "d-link"), "get"),  # retried
            (receipt(second, "accepted", "d-link"), "json"),
            (receipt(first, "accepted", "d-link"), "form"),  # late: part 1 stays delivered
            (receipt(second, "delivered", "d-link"), "form"),
            (receipt(second, "delivered", "d-link"), "json"),  # retried
        ]
        for params, how in steps:
            assert call(server, DELIVERY_PATH, params, how=how).status_code == 200
        # A client-ref no NudgeFlow text has: 404, nothing published, nothing remembered.
        other = receipt("OTHER1", "failed", "not-ours", **{"err-code": "6"})
        for how in ("form", "json"):
            assert call(server, DELIVERY_PATH, other, how=how).status_code == 404
        items = delivery.wait(lambda items: len(items) >= 2)
        delivery.poll(1.0)  # nothing else may follow
        ours = [(k, r) for k, _n, r in items if r["decision_id"] == "d-link"]
        assert [(r["status"], r["final"]) for _k, r in ours] == [
            ("accepted", False),
            ("delivered", True),
        ]
        key, done = ours[1]
        assert key == "u-ana" and done["matched"] and done["campaign_id"] == "cart"
        assert (done["parts"], done["delivered_parts"]) == (2, 2)
        assert done["message_ids"] == sorted([first, second])
        assert done["price"] == "0.06660000" and done["carrier_at"] is not None
        assert not [r for _k, _n, r in items if r["decision_id"] == "not-ours"]
        assert len(items) == 2

        # The click: 302 to the target, and a sms_link_click event keyed by the user.
        answer = requests.get(f"{server.url}/l/{code}", allow_redirects=False, timeout=10)
        assert answer.status_code == 302 and answer.headers["Location"] == target
        assert requests.head(f"{server.url}/l/{code}", timeout=10).status_code == 302
        assert requests.get(f"{server.url}/l/ZZZZZZZZZZ", timeout=10).status_code == 404
        assert requests.get(f"{server.url}/l/..%2Fx", timeout=10).status_code == 404
        events = clicks.wait(lambda items: len(items) >= 1)
        clicks.poll(0.5)
        assert len(events) == 1  # HEAD is no click
        key, name, event = events[0]
        assert (key, name, event["event_type"]) == ("u-ana", "ClickEvent", "sms_link_click")
        assert event["properties"]["decision_id"] == "d-link"
        assert event["properties"]["campaign_id"] == "cart"
        assert event["properties"]["url"] == target
        exposition = requests.get(server.url + "/metrics", timeout=10).text
        assert 'nudgeflow_delivery_receipts_total{campaign="cart",status="delivered"}' in exposition
    finally:
        server.stop()
        outcomes.close()
        delivery.close()
        clicks.close()


def test_the_webhooks_command_is_registered() -> None:
    from processors.commands.cli import COMMANDS

    assert COMMANDS["webhooks"][0] == "processors.webhooks"
    assert json.loads(json.dumps(list(COMMANDS)))  # stays a plain mapping


# --------------------------------------------------------------------------- OpenAPI fuzzing


def test_schemathesis_finds_no_server_error(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Valid and invalid requests generated from docs/webhooks.openapi.yaml never get a 5xx
    (real Redis and broker; unsigned so that requests reach the parsing and the effects)."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings

    ensure_topics(settings, [settings.topic_delivery, settings.topic_inbound])
    fuzz = settings.model_copy(update={"gateway": "outbox", "outbox_path": tmp_path / "o.jsonl"})
    spec = Path(__file__).resolve().parents[2] / "docs" / "webhooks.openapi.yaml"
    schema = schemathesis.openapi.from_path(str(spec))
    server = serve(fuzz)
    seen: list[tuple[str, str, int]] = []
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            modes = [schemathesis.GenerationMode.POSITIVE]
            if operation.path.startswith("/webhooks/"):  # the others take no input to break
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for mode in modes:

                @hsettings(
                    max_examples=15,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case: schemathesis.Case) -> None:
                    answer = case.call(base_url=server.url, allow_redirects=False, timeout=10)
                    seen.append((case.method, case.path, answer.status_code))
                    assert answer.status_code < 500, (case.method, case.path, answer.text)

                check()
    finally:
        server.stop()
    statuses = {s for _m, _p, s in seen}
    assert 200 in statuses and 400 in statuses and 404 in statuses  # it reached every layer
