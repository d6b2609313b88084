"""An existing cluster that wants a login: every NudgeFlow client logs in with the
``NUDGEFLOW_KAFKA_*`` settings (a private Apache Kafka with SASL PLAIN, real processes)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import SecretStr

from processors.devstack import StackError, create_topics
from processors.kafka.control import is_control
from processors.settings import Settings
from schemas.codec import Codec
from tests.integration.test_streams_smoke import CAMPAIGNS, NUDGEFLOW, T0, click, worker_env
from tests.support.kafka_process import KafkaProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

USERS = (("admin", "admin-secret"), ("nudgeflow", "nf-secret"))


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaProcess]:
    broker = KafkaProcess(tmp_path_factory.mktemp("sasl-kafka"), sasl_users=USERS)
    broker.start()
    yield broker
    broker.stop()


def sasl_settings(broker: KafkaProcess, tmp_path: Path, password: str) -> Settings:
    return Settings.load(
        profile="dev",
        state_dir=tmp_path,
        bootstrap_servers=broker.bootstrap,
        redis_url="redis://127.0.0.1:1/0",
        partitions=2,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="nudgeflow",
        kafka_sasl_password=SecretStr(password),
    )


def test_worker_and_clients_log_in_to_a_sasl_cluster(
    sasl_broker: KafkaProcess, tmp_path: Path
) -> None:
    settings = sasl_settings(sasl_broker, tmp_path, "nf-secret")
    create_topics(sasl_broker.bootstrap, settings)
    codec = Codec(settings.schema_registry_url)
    producer = Producer(settings.kafka_common())
    for event in (click("e1", "u-a", "add_to_cart", T0), click("e2", "u-b", "add_to_cart", T0)):
        value = codec.encode("ClickEvent", event)
        producer.produce(settings.topic_clickstream, key=event["user_id"].encode(), value=value)
    # An hour later in event time: both carts are abandoned (the worker runs the event clock).
    for user in ("u-a", "u-b"):
        later = click(f"late-{user}", user, "page_view", T0 + 3_600_000)
        value = codec.encode("ClickEvent", later)
        producer.produce(settings.topic_clickstream, key=user.encode(), value=value)
    assert producer.flush(15) == 0

    campaigns = tmp_path / "campaigns.yaml"
    campaigns.write_text(CAMPAIGNS)
    env = worker_env(
        settings,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="nudgeflow",
        kafka_sasl_password="nf-secret",
    )
    env["FAUST_DATADIR"] = str(tmp_path / "faust-data")
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [str(NUDGEFLOW), "worker", "--campaigns", str(campaigns), "--clock", "event"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    reader = Consumer({**settings.kafka_common(), "group.id": "t", "enable.auto.commit": False})
    try:
        reader.assign([TopicPartition(settings.topic_decisions, p, 0) for p in range(2)])
        users: set[str] = set()
        deadline = time.monotonic() + 90
        while users != {"u-a", "u-b"} and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            msg = reader.poll(0.2)
            if msg is not None and not msg.error() and not is_control(msg.headers()):
                users.add(codec.decode(msg.value())[1]["user_id"])
        assert users == {"u-a", "u-b"}, log.read_text()
    finally:
        reader.close()
        worker.terminate()
        worker.wait(30)
    assert "nf-secret" not in log.read_text()


def test_a_wrong_password_is_a_clear_error(sasl_broker: KafkaProcess, tmp_path: Path) -> None:
    settings = sasl_settings(sasl_broker, tmp_path, "wrong")
    with pytest.raises(StackError) as failed:
        create_topics(sasl_broker.bootstrap, settings, timeout=10)
    assert "auth" in str(failed.value).lower()
    assert "wrong" not in json.dumps(str(failed.value))
