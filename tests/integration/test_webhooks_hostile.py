"""Hostile input to the webhook service, beyond tests/test_webhooks.py: replayed signed requests,
receipts for texts we never sent, malformed and oversized bodies, odd methods and link codes.

Whatever arrives, the answer is a 2xx (a genuine retry) or a 4xx, never a 5xx, the consent and
send state in Redis does not change, and the service keeps answering. Same real stack as
tests/test_webhooks.py (redis-server, Apache Kafka, the vonage SDK against the local HTTPS
fake), and the same helpers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from processors.redis import RedisStore
from processors.redis.client import Client
from processors.settings import Settings
from processors.webhooks import (
    DELIVERY_PATH,
    INBOUND_PATH,
    BackgroundServer,
    WebhookError,
    sign_params,
)
from processors.webhooks.params import json_params
from tests.fakes.vonage_fake import VonageFake
from tests.integration.test_webhooks import (
    ANA,
    BEN,
    SECRET,
    call,
    contacts,
    inbound,
    receipt,
    sent_to,
    serve,
    vonage_now,
    wait_until,
)
from tests.integration.test_webhooks import any_wsettings as any_wsettings  # noqa: F401
from tests.integration.test_webhooks import fake as fake  # noqa: F401  (fixtures, used by name)
from tests.integration.test_webhooks import wsettings as wsettings  # noqa: F401


@pytest.fixture
def server(
    wsettings: Settings, fake: VonageFake, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[BackgroundServer]:
    contacts(tmp_path, wsettings)
    srv = serve(wsettings)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def any_server(
    any_wsettings: Settings, fake: VonageFake, tmp_path: Path
) -> Iterator[BackgroundServer]:
    """:func:`server` on a single Redis, then on a Redis Cluster (``any_redis``)."""
    contacts(tmp_path, any_wsettings)
    srv = serve(any_wsettings)
    try:
        yield srv
    finally:
        srv.stop()


def _consents(store: RedisStore) -> tuple[object, ...]:
    ana, ben = store.contact("u-ana"), store.contact("u-ben")
    return (
        ana.consent if ana else None,
        ben.consent if ben else None,
        store.phone_consent(ANA),
        store.phone_consent(BEN),
    )


def _settle(server: BackgroundServer) -> None:
    server.call(server.service.wait_replies())


def test_replayed_signed_requests_change_nothing(
    any_server: BackgroundServer, fake: VonageFake, any_redis: Client
) -> None:
    """Someone who captured signed requests replays them later: an old STOP after a newer
    START, an old START after a newer STOP, and a STOP with a new message id but the old
    signature. None changes the consent or sends a text."""
    store = RedisStore(any_redis)
    url = any_server.url + INBOUND_PATH
    stop = sign_params(
        inbound(ANA, "STOP", "MSG-R-STOP", **{"message-timestamp": vonage_now(-20)}), SECRET
    )
    start = sign_params(
        inbound(ANA, "START", "MSG-R-START", **{"message-timestamp": vonage_now(-10)}), SECRET
    )
    assert requests.post(url, data=stop, timeout=10).status_code == 200
    assert requests.post(url, data=start, timeout=10).status_code == 200
    _settle(any_server)
    wait_until(lambda: len(sent_to(fake, ANA)) == 2)  # the STOP and START confirmations
    assert store.contact("u-ana").consent == "opted_in"
    before = _consents(store)

    # the old STOP, as captured, by every transport Vonage uses
    assert requests.post(url, data=stop, timeout=10).status_code == 200
    assert requests.get(url, params=stop, timeout=10).status_code == 200
    assert requests.post(url, json=stop, timeout=10).status_code == 200
    # the old STOP's signature on a new message id: not a retry, a forgery
    forged = {**stop, "messageId": "MSG-R-STOP-2"}
    answer = requests.post(url, data=forged, timeout=10)
    assert (answer.status_code, answer.json()["error"]) == (401, "bad_signature")
    _settle(any_server)
    assert _consents(store) == before

    # a newer STOP (signed by Vonage), then the captured START again
    newer = inbound(ANA, "STOP", "MSG-R-STOP-3")
    assert call(any_server, INBOUND_PATH, newer).status_code == 200
    assert requests.post(url, data=start, timeout=10).status_code == 200
    _settle(any_server)
    wait_until(lambda: len(sent_to(fake, ANA)) == 3)
    assert store.contact("u-ana").consent == "opted_out"
    time.sleep(0.3)
    _settle(any_server)
    assert len(sent_to(fake, ANA)) == 3  # no confirmation for any replay


def test_receipts_for_texts_we_never_sent_change_no_send_state(
    server: BackgroundServer, redis_client: redis.Redis
) -> None:
    store = RedisStore(redis_client)
    before = _consents(store)
    answers = {
        "unknown": call(server, DELIVERY_PATH, receipt("X-1", "delivered", "d-never-sent")),
        "traversal": call(server, DELIVERY_PATH, receipt("X-2", "failed", "../../etc/passwd")),
        "control": call(server, DELIVERY_PATH, receipt("X-3", "delivered", "d-\x00\x1b[2J")),
        "too long": call(server, DELIVERY_PATH, receipt("X-4", "delivered", "d" * 101)),
        "retry": call(server, DELIVERY_PATH, receipt("X-1", "delivered", "d-never-sent")),
    }
    codes = {name: a.status_code for name, a in answers.items()}
    assert all(c < 500 for c in codes.values()), codes
    assert codes["too long"] == 400
    for ref in ("d-never-sent", "../../etc/passwd"):
        assert store.sent_ref(ref) is None
    assert _consents(store) == before
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


MALFORMED: list[tuple[str, dict[str, object]]] = [
    ("repeated parameter", {"data": "msisdn=14155550100&msisdn=12125550101&text=STOP"}),
    ("too many parameters", {"data": "&".join(f"p{i}=1" for i in range(600))}),
    ("bad percent escapes", {"data": "msisdn=%ZZ&text=%ff%fe&messageId=%"}),
    ("JSON array", {"data": b"[1,2,3]", "headers": {"Content-Type": "application/json"}}),
    ("JSON nested value", {"json": {"msisdn": {"$gt": ""}, "text": "STOP"}}),
    ("JSON list value", {"json": {"msisdn": ["14155550100"], "text": "STOP"}}),
    ("JSON lone surrogate", {"data": b'{"text": "\\ud800"}',
                             "headers": {"Content-Type": "application/json"}}),
    ("JSON huge number", {"data": b'{"msisdn": ' + b"9" * 5000 + b"}",
                          "headers": {"Content-Type": "application/json"}}),
    ("not UTF-8 JSON", {"data": b'{"text": "\xff"}',
                        "headers": {"Content-Type": "application/json"}}),
    ("multipart form", {"files": {"text": ("t.txt", b"STOP")}}),
    ("XML", {"data": b"<x/>", "headers": {"Content-Type": "application/xml"}}),
    ("chunked, over the limit", {"data": iter([b"text=" + b"x" * 3000, b"y" * 3000])}),
    ("NUL bytes, unsigned", {"data": {"msisdn": "14155550100", "text": "STOP\x00",
                                      "messageId": "N"}}),
]  # fmt: skip


def test_malformed_requests_odd_methods_and_link_codes_are_4xx_and_change_nothing(
    server: BackgroundServer, redis_client: redis.Redis
) -> None:
    store = RedisStore(redis_client)
    before = _consents(store)
    for name, how in MALFORMED:
        for path in (INBOUND_PATH, DELIVERY_PATH):
            answer = requests.post(server.url + path, timeout=10, **how)  # type: ignore[arg-type]
            assert 400 <= answer.status_code < 500, (name, path, answer.status_code)
            assert "error" in answer.json(), name
    for method in ("PUT", "DELETE", "PATCH"):
        assert requests.request(method, server.url + INBOUND_PATH, timeout=10).status_code == 405
    for code in ("..%2F..%2Fetc%2Fpasswd", "a" * 500, "%00", "ZZZZZZZZ", "é"):
        answer = requests.get(f"{server.url}/l/{code}", timeout=10, allow_redirects=False)
        assert answer.status_code == 404, (code, answer.status_code)
    # Vonage signs what it sends; a leaked secret or a bug on its side must still not crash us
    signed_nonsense = [
        inbound("+0", "STOP"),
        inbound("not-a-number", "STOP"),
        inbound(ANA, "STOP", "M" * 500),
        inbound(ANA, "STOP", **{"message-timestamp": "yesterday"}),
        {k: v for k, v in inbound(ANA, "STOP").items() if k != "messageId"},
    ]
    codes = [call(server, INBOUND_PATH, c).status_code for c in signed_nonsense]
    assert codes == [400] * len(signed_nonsense), codes
    assert _consents(store) == before
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_deeply_nested_json_is_a_400() -> None:
    with pytest.raises(WebhookError) as info:
        json_params(b"[" * 3000)
    assert info.value.status == 400


def test_webhook_service_refuses_to_start_in_production_without_a_signature_secret() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("NUDGEFLOW_")}
    env["NUDGEFLOW_PROFILE"] = "prod"
    exe = Path(sys.executable).with_name("nudgeflow")
    proc = subprocess.run(
        [str(exe), "webhooks"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET" in proc.stderr
