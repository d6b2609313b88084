"""The real dispatcher on a single Redis and on a Redis Cluster (3 masters + 3 replicas): the
same replay (a simulated clickstream through the engine, the example campaigns, STOP and START
keywords in event time) decided through the real broker and the real vonage SDK against the
local HTTPS fake ends every decision with the same status and reason on both."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from processors.commands.contacts import import_contacts
from processors.core.campaign import load_campaigns
from processors.core.decision import Decision, DecisionCancelled
from processors.core.engine import Engine
from processors.core.outcome import SmsOutcome
from processors.devstack import StackInfo
from processors.devstack.redis_cluster import LocalRedisCluster
from processors.redis import RedisStore
from processors.redis.client import connect
from processors.settings import Settings
from processors.simulate import generate
from tests.conftest import delete_topics, isolated_settings
from tests.fakes.vonage_fake import VonageFake
from tests.integration.test_dispatcher import (
    Bus,
    Reader,
    fake,  # noqa: F401 - fixture
    refs,
    running,
    vsettings,  # noqa: F401 - fixture
)
from tests.integration.test_exits import CAMPAIGNS, LATENESS, engine_records
from tests.integration.test_pipeline import _contacts_for
from tests.support.redis_backends import cluster_url, flushed

pytestmark = pytest.mark.integration

USERS, EVENTS, SEED = 80, 2_400, 7


def replay_through(
    settings: Settings,
    records: list[Decision | DecisionCancelled],
    contacts: Path,
    keywords: list[tuple[str, str, int]],
) -> list[SmsOutcome]:
    """``records`` through a dispatcher (event clock) on ``settings.redis_url``, emptied first,
    with the contacts and the keyword timeline (phone, status, time) in place: every outcome
    published until each partition reached its end of input."""
    with flushed(connect(settings.redis_url)) as client:
        store = RedisStore(client)
        for phone, status, at in keywords:
            store.record_keyword(phone, status, at)
        import_contacts(contacts, settings)
        reader = Reader(settings, settings.topic_outcomes)
        try:
            with running(settings, yaml.safe_load(CAMPAIGNS.read_text()), rate_per_s=500):
                bus = Bus(settings)
                bus.send(*records)
                bus.end_of_input()
                reader.poll_until(lambda: reader.flushes.all_complete(), timeout_s=60)
            assert store.deferred_count() == 0  # every held text was released or cancelled
            return reader.outcomes
        finally:
            reader.close()


def test_the_same_replay_gives_the_same_outcomes_on_a_single_redis_and_a_cluster(
    vsettings: Settings,  # noqa: F811 - fixture
    fake: VonageFake,  # noqa: F811 - fixture
    stack: StackInfo,
    single_redis_url: str,
    redis_cluster: LocalRedisCluster,
    tmp_path: Path,
) -> None:
    """The decisions topic has one partition and the records are on it in time order, so the
    dispatcher decides them and releases held texts in the replay's own order (a partition read
    ahead of the others can decide a user's later decision before a held text of theirs due
    earlier is released, and the cap then keeps whichever came first, on any backend)."""
    engine = Engine(load_campaigns(CAMPAIGNS), allowed_lateness_ms=LATENESS, lazy_commit=False)
    records = sorted(
        engine_records(engine, list(generate(USERS, EVENTS, SEED))),
        key=lambda r: r.fire_at if isinstance(r, Decision) else r.at,
    )
    decisions = [r for r in records if isinstance(r, Decision)]
    path = tmp_path / "contacts.jsonl"
    contacts = _contacts_for(USERS, path)
    # Three numbers text STOP halfway through the replay; one of them START a day later.
    middle = decisions[len(decisions) // 2].fire_at
    texted = [contacts[d.user_id]["phone"] for d in decisions[1::9] if d.user_id in contacts][:3]
    keywords = [(p, "opted_out", middle) for p in texted]
    keywords.append((texted[0], "opted_in", middle + 86_400_000))

    runs: dict[str, list[SmsOutcome]] = {}
    texts: dict[str, list[str]] = {}
    for backend, url in [("single", single_redis_url), ("cluster", cluster_url(redis_cluster))]:
        isolated = isolated_settings(stack, partitions=1)
        topics = {n: getattr(isolated, n) for n in Settings.model_fields if n.startswith("topic_")}
        settings = vsettings.model_copy(
            update={"clock": "event", "redis_url": url, "partitions": 1,
                    "dispatcher_group": isolated.dispatcher_group, **topics}
        )  # fmt: skip
        try:
            runs[backend] = replay_through(settings, records, path, keywords)
        finally:
            delete_topics(stack.bootstrap_servers, isolated.topic_clickstream.rsplit("-", 1)[1])
        texts[backend] = sorted(refs(fake))
        fake.reset()

    final = {o.decision_id: (o.status, o.reason) for o in runs["single"] if o.final}
    assert set(final) == {d.decision_id for d in decisions}
    assert {o.decision_id: (o.status, o.reason) for o in runs["cluster"] if o.final} == final
    assert texts["cluster"] == texts["single"]  # the same texts went out, each once
    assert len(texts["single"]) == len(set(texts["single"]))
    # The replay reached every part of the policy that the cluster lays out differently.
    seen = Counter(final.values())
    assert any(o.status == "deferred" for o in runs["single"])  # quiet hours held texts
    for outcome in [
        ("sent", None),
        ("suppressed", "frequency_cap"),
        ("suppressed", "opted_out"),
        ("suppressed", "no_contact"),
        ("cancelled", "converted"),
    ]:
        assert seen[outcome] > 0, (outcome, seen)
    stopped = [d.decision_id for d in decisions if d.fire_at >= middle and
               d.user_id in contacts and contacts[d.user_id]["phone"] in texted[1:]]  # fmt: skip
    assert stopped and {final[i] for i in stopped} == {("suppressed", "opted_out")}
