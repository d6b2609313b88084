"""Topic administration for dev stacks."""

from __future__ import annotations

from processors.settings import Settings


def ensure_topics(settings: Settings, names: list[str], timeout: float = 15.0) -> list[str]:
    """Create the topics of ``names`` that do not exist yet (dev stacks); returns the created."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka_common())
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    new = [NewTopic(n, settings.partitions, settings.replication_factor) for n in missing]
    created = []
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created
