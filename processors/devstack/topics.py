"""Every topic NudgeFlow uses, and creating them on a broker."""

from __future__ import annotations

import concurrent.futures
import logging
import time

from processors.devstack.info import StackError
from processors.settings import Settings

log = logging.getLogger("nudgeflow.devstack")


def topic_specs(settings: Settings) -> dict[str, dict[str, str]]:
    """Every topic NudgeFlow uses, with its topic-level config."""
    return {
        settings.topic_clickstream: {},
        settings.topic_clickstream_dlq: {},
        settings.topic_decisions: {},
        settings.topic_outcomes: {},
        settings.topic_contacts: {"cleanup.policy": "compact"},
        settings.topic_sms_dlq: {},
        settings.topic_ticks: {},
        settings.topic_conversions: {},
        settings.topic_delivery: {},
        settings.topic_inbound: {},
    }


def create_topics(bootstrap: str, settings: Settings, timeout: float = 15.0) -> list[str]:
    """Create all topics with ``settings.partitions`` partitions; return the newly created ones.

    Idempotent: topics that already exist are left as they are (even if their partition count
    differs). A broker that rejects a topic config gets the topic without it and a warning,
    since compaction only bounds disk use.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    client_errors: list[str] = []  # e.g. a refused login, which librdkafka only retries

    def on_error(err: KafkaError) -> None:
        client_errors.append(err.str())

    conf = {**settings.kafka_common(), "bootstrap.servers": bootstrap, "error_cb": on_error}
    admin = AdminClient(conf)
    specs = topic_specs(settings)

    def attempt(names: dict[str, dict[str, str]]) -> dict[str, KafkaError | None]:
        new = [
            NewTopic(n, settings.partitions, settings.replication_factor, config=c)
            for n, c in names.items()
        ]
        results: dict[str, KafkaError | None] = {}
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result(timeout=timeout)
                results[name] = None
            except KafkaException as exc:
                results[name] = exc.args[0]
            except concurrent.futures.TimeoutError:
                raise StackError(
                    f"creating topic {name} on {bootstrap} timed out after {timeout:g} s"
                    f"{last_client_error()}"
                ) from None
        return results

    def last_client_error() -> str:
        admin.poll(0)  # serves error_cb
        return f" (client error: {client_errors[-1]})" if client_errors else ""

    created: list[str] = []
    retry: dict[str, dict[str, str]] = {}
    for name, err in attempt(specs).items():
        if err is None:
            created.append(name)
        elif err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            continue
        elif specs[name] and err.code() in (
            KafkaError.INVALID_CONFIG,
            KafkaError.POLICY_VIOLATION,
            KafkaError.UNSUPPORTED_VERSION,
        ):
            log.warning(
                "broker rejected config %s for %s (%s); creating it without",
                specs[name],
                name,
                err.str(),
            )
            retry[name] = {}
        else:
            raise StackError(
                f"creating topic {name} on {bootstrap} failed: {err.str()}{last_client_error()}"
            )
    for name, err in (attempt(retry) if retry else {}).items():
        if err is None:
            created.append(name)
        elif err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise StackError(f"creating topic {name} on {bootstrap} failed: {err.str()}")

    # Wait until metadata lists every partition, so producers never race topic creation.
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=timeout)
        missing = [n for n in specs if n not in md.topics or md.topics[n].error is not None]
        if not missing:
            return created
        if time.monotonic() > deadline:
            raise StackError(f"topics {missing} not visible on {bootstrap} after {timeout:.0f} s")
        time.sleep(0.1)
