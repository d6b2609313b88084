"""Configuration: every setting comes from a ``NUDGEFLOW_*`` environment variable.

Production defaults point at a real cluster. ``NUDGEFLOW_PROFILE=dev`` points at the embedded
stack: broker and Redis addresses are read from the state file that ``nudgeflow dev up`` writes,
and consumer-group timeouts are short so that joins take ~3 s on tansu instead of ~30 s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_state_dir() -> Path:
    """Where the embedded stack keeps its pid files, logs and addresses."""
    return Path(os.environ.get("NUDGEFLOW_STATE_DIR", REPO_ROOT / ".nudgeflow"))


class Settings(BaseSettings):
    """All knobs of NudgeFlow. Secrets are ``SecretStr`` so they never reach logs or reprs."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_", extra="ignore")

    profile: Literal["prod", "dev"] = "prod"
    state_dir: Path = REPO_ROOT / ".nudgeflow"

    # Kafka
    bootstrap_servers: str = "localhost:9092"
    schema_registry_url: str = "http://localhost:8081"
    session_timeout_ms: int = 45_000
    heartbeat_interval_ms: int = 3_000
    partitions: int = 6
    replication_factor: int = 1

    # Topics
    topic_clickstream: str = "clickstream"
    topic_clickstream_dlq: str = "clickstream-dlq"
    topic_decisions: str = "sms-decisions"
    topic_outcomes: str = "sms-outcomes"
    topic_contacts: str = "contacts"
    topic_sms_dlq: str = "sms-dlq"
    topic_ticks: str = "nudgeflow-ticks"

    # Redis
    redis_url: str = "redis://localhost:6379/0"

    # Engine
    campaigns_file: Path = REPO_ROOT / "examples" / "campaigns.yaml"
    clock: Literal["live", "event"] = "live"
    allowed_lateness_s: float = 30.0
    worker_id: str = "nudgeflow-worker"
    worker_web_port: int = 6066

    # Dispatcher
    dispatcher_group: str = "nudgeflow-dispatcher"
    gateway: Literal["outbox", "vonage"] = "vonage"
    outbox_path: Path = Path("outbox.jsonl")
    vonage_api_key: SecretStr | None = None
    vonage_api_secret: SecretStr | None = None
    vonage_from: str = "NudgeFlow"
    vonage_rest_host: str = "rest.nexmo.com"
    vonage_timeout_s: float = 10.0
    cooldown_s: float = 4 * 3600.0
    default_timezone: str = "UTC"

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """Build settings from the environment; the dev profile fills in embedded-stack addresses.

        Explicit environment variables always win over the state file.
        """
        settings = cls(**overrides)  # type: ignore[arg-type]
        if settings.profile != "dev":
            return settings
        dev: dict[str, object] = {
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
            "schema_registry_url": "mock://nudgeflow",
            "gateway": "outbox",
            "partitions": 4,
        }
        state = settings.state_dir / "stack.json"
        if state.exists():
            addrs = json.loads(state.read_text())
            dev["bootstrap_servers"] = addrs["bootstrap_servers"]
            dev["redis_url"] = addrs["redis_url"]
        explicit = {k for k in cls.model_fields if f"NUDGEFLOW_{k.upper()}" in os.environ}
        explicit |= set(overrides)
        return settings.model_copy(update={k: v for k, v in dev.items() if k not in explicit})

    def kafka_common(self) -> dict[str, object]:
        """librdkafka settings shared by every confluent-kafka client."""
        return {"bootstrap.servers": self.bootstrap_servers}

    def consumer_conf(self, group_id: str) -> dict[str, object]:
        return {
            **self.kafka_common(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
        }
