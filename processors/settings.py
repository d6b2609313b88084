"""Configuration: every setting comes from a ``NUDGEFLOW_*`` environment variable.

Production defaults point at a real cluster. ``NUDGEFLOW_PROFILE=dev`` points at the embedded
stack: broker and Redis addresses are read from the state file that ``nudgeflow dev up`` writes,
and consumer-group timeouts are short (6 s session, 1 s heartbeat) so that a stopped process's
partitions move within seconds.

Secrets (Vonage key and secret, webhook signature secret, link secret) are ``SecretStr``: repr,
``str`` and ``model_dump_json`` show ``**********``. Each can also come from a file named by
``NUDGEFLOW_<NAME>_FILE`` (the Docker / Kubernetes secrets convention, e.g.
``NUDGEFLOW_VONAGE_API_SECRET_FILE=/run/secrets/vonage``); the variable itself wins when both are
set. Passwords inside ``redis_url`` / ``schema_registry_url`` are masked in repr and JSON dumps.
"""

from __future__ import annotations

import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_serializer, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIX = "NUDGEFLOW_"
_URL_CREDENTIALS = re.compile(r"(?<=://)([^/@:\s]*):([^/@\s]+)@")


class SecretFileError(SettingsError):
    """``NUDGEFLOW_<NAME>_FILE`` names a file that cannot be read (the message never holds the
    secret, only the variable, the path and why)."""


def redact_url(url: str) -> str:
    """``redis://:pw@host`` -> ``redis://:**********@host``: safe to log or dump."""
    return _URL_CREDENTIALS.sub(r"\1:**********@", url)


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


class SecretFilesSource(PydanticBaseSettingsSource):
    """Secret fields from the files that ``NUDGEFLOW_<NAME>_FILE`` variables name (content with
    the trailing line break removed)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ does the work

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            if not _is_secret(field.annotation):
                continue
            var = f"{ENV_PREFIX}{name.upper()}_FILE"
            path = os.environ.get(var)
            if not path:
                continue
            try:
                values[name] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise SecretFileError(f"{var}: {path} is not UTF-8 text") from None
            except OSError as exc:
                raise SecretFileError(f"{var}: cannot read {path} ({exc.strerror})") from None
        return values


def default_state_dir() -> Path:
    """Where the embedded stack keeps its pid files, logs and addresses."""
    return Path(os.environ.get("NUDGEFLOW_STATE_DIR", REPO_ROOT / ".nudgeflow"))


class Settings(BaseSettings):
    """All knobs of NudgeFlow. Secrets are ``SecretStr`` so they never reach logs or reprs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    profile: Literal["prod", "dev"] = "prod"
    state_dir: Path = REPO_ROOT / ".nudgeflow"
    # Log level of the worker and the dispatcher; None: each command's own default (worker
    # warning, dispatcher info). Logs never hold phone numbers, message texts or secrets.
    log_level: Literal["debug", "info", "warning", "error", "critical"] | None = None

    # Kafka
    bootstrap_servers: str = "localhost:9092"
    schema_registry_url: str = "http://localhost:8081"
    session_timeout_ms: int = 45_000
    heartbeat_interval_ms: int = 3_000
    partitions: int = 6
    replication_factor: int = 1
    # An existing cluster's security: every confluent-kafka client and the Faust worker use it.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: Path | None = None  # PEM bundle of the brokers' CA; default: system's

    # Topics
    topic_clickstream: str = "clickstream"
    topic_clickstream_dlq: str = "clickstream-dlq"
    topic_decisions: str = "sms-decisions"
    topic_outcomes: str = "sms-outcomes"
    topic_contacts: str = "contacts"
    topic_sms_dlq: str = "sms-dlq"
    topic_ticks: str = "nudgeflow-ticks"
    topic_conversions: str = "sms-conversions"  # attributed conversions (nudgeflow attribution)

    # Redis: redis://host:port/db (rediss:// for TLS) for a single Redis (or a primary with
    # replicas), redis+cluster://host:port (rediss+cluster://) for a Redis Cluster: any node as
    # the seed (processors.redis.client.connect).
    redis_url: str = "redis://localhost:6379/0"

    # Engine
    campaigns_file: Path = REPO_ROOT / "examples" / "campaigns.yaml"
    clock: Literal["live", "event"] = "live"
    allowed_lateness_s: float = 30.0
    # A user idle this long (event time) is forgotten: bounds the state of a worker that sees
    # millions of one-visit users. 30 days: longer than every campaign window.
    state_ttl_s: float = Field(default=30 * 86_400.0, gt=0)
    # Decoded states the worker keeps of its most recently active users (streams.state.cache):
    # ~6 KB each, so 20,000 is ~120 MB; 0 turns the cache off (every event decodes its state).
    state_cache_users: int = Field(default=20_000, ge=0)
    # Longest a state change stays only in the worker's memory before its checkpoint: a longer
    # interval writes fewer changelog records, a killed worker replays more on restart.
    worker_checkpoint_interval_ms: int = Field(default=500, ge=10, le=600_000)
    # A worker whose event loop stops, or whose rebalance or table recovery neither ends nor
    # moves for this long, exits to be restarted (streams/watchdog.py); 0 disables the check.
    worker_stall_timeout_s: float = Field(default=90.0, ge=0)
    worker_id: str = "nudgeflow-worker"
    worker_web_port: int = 6066
    # Faust table store: RocksDB (rocksdict) keeps state on local disk across restarts, so a
    # restarted worker replays only the changelog tail; "memory://" replays all of it.
    worker_store: str = "rocksdb://"

    # Observability: every process serves Prometheus /metrics on this port (0 = off)
    metrics_port: int = 9100

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

    # Webhooks (``nudgeflow webhooks``): receipts, inbound texts, tracked links
    topic_delivery: str = "sms-delivery"
    topic_inbound: str = "sms-inbound"
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8080
    # Vonage signed webhooks: when a secret is set, unsigned or wrongly signed requests get 401.
    webhook_signature_secret: SecretStr | None = None
    webhook_signature_method: Literal["md5hash", "md5", "sha1", "sha256", "sha512"] = "sha256"
    webhook_timestamp_tolerance_s: float = 300.0
    webhook_max_body_bytes: int = 16_384
    webhook_dedup_ttl_s: float = 3 * 86_400.0  # Vonage retries for 24 h
    # Short links: the dispatcher rewrites URLs only when a base URL is set.
    link_base_url: str | None = None
    link_ttl_s: float = 30 * 86_400.0
    link_secret: SecretStr | None = None
    help_text: str = "NudgeFlow alerts: reply STOP to opt out, START to opt back in."
    stop_confirmation_text: str = (
        "You are unsubscribed and will receive no more texts from us. Reply START to resubscribe."
    )
    start_confirmation_text: str = "You are subscribed again. Reply HELP for help, STOP to opt out."

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then ``NUDGEFLOW_*`` variables, then ``NUDGEFLOW_*_FILE`` secret files."""
        return (
            init_settings,
            env_settings,
            SecretFilesSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return {"warn": "warning", "": None}.get(value, value)
        return value

    @field_serializer("redis_url", "schema_registry_url", when_used="json")
    def _redact(self, url: str) -> str:
        return redact_url(url)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in ("redis_url", "schema_registry_url") else value

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
            "worker_store": "memory://",
            "metrics_port": 0,  # several processes share one host; tests pick free ports
        }
        state = settings.state_dir / "stack.json"
        if state.exists():
            addrs = json.loads(state.read_text())
            dev["bootstrap_servers"] = addrs["bootstrap_servers"]
            dev["redis_url"] = addrs["redis_url"]
        explicit = {k for k in cls.model_fields if f"NUDGEFLOW_{k.upper()}" in os.environ}
        explicit |= set(overrides)
        return settings.model_copy(update={k: v for k, v in dev.items() if k not in explicit})

    def kafka_common(self) -> dict[str, Any]:
        """librdkafka settings shared by every confluent-kafka client (never log them: they may
        hold the SASL password)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        protocol = self.kafka_security_protocol
        if protocol == "PLAINTEXT":
            return conf
        conf["security.protocol"] = protocol
        if protocol.startswith("SASL_"):
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username or ""
            password = self.kafka_sasl_password
            conf["sasl.password"] = password.get_secret_value() if password else ""
        if protocol.endswith("SSL") and self.kafka_ssl_ca_location is not None:
            conf["ssl.ca.location"] = str(self.kafka_ssl_ca_location)
        return conf

    def consumer_conf(self, group_id: str) -> dict[str, object]:
        return {
            **self.kafka_common(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
        }
