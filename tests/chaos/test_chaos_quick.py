"""The quick chaos run of ``make test`` (< 60 s): one SIGKILL of the worker and of the
dispatcher, one short Redis restart, one gateway fault window, over a small replay. The same
invariants as ``make chaos`` (tests/chaos/test_chaos.py): decisions equal the backtest, every
decision has an outcome, no text twice, the rate limit holds, no gateway call without Redis,
every gateway failure on sms-dlq."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from processors.contacts_import import import_contacts
from processors.settings import Settings
from tests.chaos.harness import Chaos, accepted, write_summary
from tests.fakes.vonage_fake import VonageFake
from tests.test_dispatcher import (
    Bus,
    Reader,
    campaign_doc,
    contact_rows,
    daytime_zone,
    decision,
    running,
    write_jsonl,
)

# Runs with `make chaos` for now: it kills a worker on tansu, whose high-watermark bug
# (docs/chaos.md, finding 1) can lose a changelog batch; back into `make test` once fixed.
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def test_quick_chaos_loses_nothing_and_sends_nothing_twice(tmp_path: Path) -> None:
    chaos = Chaos(tmp_path / "chaos", events=3_000, users=300, seed=11)
    try:
        chaos.start()
        chaos.rss.phase = "steady"
        chaos.feeder.feed(rate=200.0, limit=len(chaos.events))
        chaos.wait_worker_progress()
        # Restarted once its group session (6 s) has expired: a worker that rejoins at once
        # while tansu still counts the dead member can stall the group for up to a minute
        # (docs/chaos.md), too long for make test.
        chaos.kill(chaos.by_role("worker")[0], restart_after_s=7)
        time.sleep(3)
        chaos.kill(chaos.by_role("dispatcher")[0])
        time.sleep(3)
        chaos.restart_redis(down_s=1.5)
        chaos.gateway_faults(40)
        chaos.wait_caught_up(timeout_s=90, settle_s=3)
        chaos.end_of_input(timeout_s=60)
    finally:
        chaos.stop()
    report = chaos.report()
    write_summary(report, chaos.timeline)
    assert not report.problems, report.problems
    assert (report.kills, report.redis_restarts) == (2, 1)
    assert report.expected_decisions > 100 and report.statuses["sent"] > 20
    assert report.gateway_faults > 10  # the window was reached


@pytest.mark.xfail(
    strict=True,
    reason="known (docs/chaos.md): a read timeout after Vonage took the text is retried, and the "
    "retry is a second text; the SMS API has no idempotency key, so only not retrying can help",
)
def test_a_timeout_after_the_gateway_took_the_text_does_not_send_it_twice(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with VonageFake() as fake:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", fake.ca_path)
        settings = settings.model_copy(
            update={
                "clock": "live",
                "gateway": "vonage",
                "vonage_rest_host": fake.host,
                "vonage_api_key": SecretStr(fake.api_key),
                "vonage_api_secret": SecretStr(fake.api_secret),
                "vonage_timeout_s": 1.0,
            }
        )
        import_contacts(write_jsonl(tmp_path / "c.jsonl", contact_rows(daytime_zone())), settings)
        # The fake takes the text, then answers after the dispatcher's 1 s timeout has passed.
        fake.script([f"delay:{settings.vonage_timeout_s + 0.6}"])
        reader = Reader(settings, settings.topic_outcomes)
        try:
            with running(settings, campaign_doc()):
                Bus(settings).send(decision("d-slow", "u-ana", int(time.time() * 1000)))
                final = reader.wait_final({"d-slow"}, timeout_s=30)
        finally:
            reader.close()
    took = [
        q for q in fake.requests if q.fields.get("client-ref") == "d-slow" and accepted(q.reply)
    ]
    print(f"outcome {final['d-slow'].status}; texts the gateway took: {len(took)}")
    assert len(took) == 1
