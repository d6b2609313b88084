"""``nudgeflow worker``: run the Faust trigger worker.

Configuration comes from ``NUDGEFLOW_*`` (``Settings.load()``); the flags override the campaign
file and the clock. Prometheus metrics are served on ``NUDGEFLOW_METRICS_PORT`` (``/metrics``,
0 = off). SIGTERM/SIGINT stop the worker cleanly (Faust's worker leaves the group,
flushes the producer and commits), and the command exits 0.

On stderr, even at the default log level (warn): one line at start (group, topics, campaigns,
clock) and one per change of the partitions assigned; ``--loglevel error`` hides them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from processors.settings import Settings

if TYPE_CHECKING:
    import faust

    from streams.agents import TriggerShell

LOGLEVELS = ("debug", "info", "warn", "error", "critical")


class WorkerSetupError(RuntimeError):
    """The worker cannot start: bad campaign file, missing topics, unreachable registry."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--campaigns", type=Path, default=None, help="campaign file (YAML); default from settings"
    )
    parser.add_argument(
        "--clock",
        choices=("live", "event"),
        default=None,
        help="live: wall-clock ticks fire timers; event: only events and flush records move time",
    )
    parser.add_argument(
        "--loglevel",
        choices=LOGLEVELS,
        default=None,
        help="Faust log level (default: NUDGEFLOW_LOG_LEVEL, else warn)",
    )


def check_topics(settings: Settings, timeout: float = 15.0) -> None:
    """The clickstream (and, live, the ticks topic) must have ``settings.partitions`` partitions:
    the state table and the ticks are co-partitioned with the clickstream."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    names = [settings.topic_clickstream]
    if settings.clock == "live":
        names.append(settings.topic_ticks)
    # log_level 2: connection failures are reported once, below, not every 50 ms by librdkafka.
    admin = AdminClient({**settings.kafka_common(), "log_level": 2})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise WorkerSetupError(
            f"cannot reach the broker at {settings.bootstrap_servers}: {exc.args[0]}"
        ) from None
    for name in names:
        topic = metadata.topics.get(name)
        if topic is None or topic.error is not None:
            raise WorkerSetupError(
                f"topic {name!r} does not exist (create the topics first, e.g. `nudgeflow dev up`)"
            )
        if len(topic.partitions) != settings.partitions:
            raise WorkerSetupError(
                f"topic {name!r} has {len(topic.partitions)} partitions, expected "
                f"{settings.partitions} (NUDGEFLOW_PARTITIONS): state and ticks are "
                f"co-partitioned with the clickstream"
            )


def build(settings: Settings) -> tuple[faust.App, TriggerShell]:
    """The configured Faust app and its :class:`streams.agents.TriggerShell`."""
    from processors.core.campaign import CampaignError, load_campaigns
    from schemas.codec import Codec
    from streams.agents import install
    from streams.app import make_app

    try:
        campaigns = load_campaigns(settings.campaigns_file)
    except CampaignError as exc:
        raise WorkerSetupError(str(exc)) from None
    try:
        codec = Codec(settings.schema_registry_url)
        for name in ("ClickEvent", "TriggerDecision", "DecisionCancelled"):
            codec.schema_id(name)  # no registry round trip on the hot path
    except Exception as exc:
        raise WorkerSetupError(
            f"schema registry {settings.schema_registry_url}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        app = make_app(settings)
    except ValueError as exc:
        raise WorkerSetupError(str(exc)) from None
    shell = install(app, settings, campaigns, codec=codec)
    return app, shell


def show_status(loglevel: str) -> logging.Logger:
    """Send the status lines (:data:`streams.assignment.STATUS_LOGGER`) to stderr at ``loglevel``
    ``debug``/``info``/``warn``, independently of Faust's logging setup; hide them above."""
    from streams.assignment import STATUS_LOGGER

    logger = logging.getLogger(STATUS_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # Faust's root handler would print them twice at info
    logger.setLevel(logging.INFO if loglevel in ("debug", "info", "warn") else logging.ERROR)
    return logger


def run(args: argparse.Namespace) -> int:
    import faust  # noqa: F811  (runtime import; Faust is slow to import)

    overrides: dict[str, object] = {}
    if args.campaigns is not None:
        overrides["campaigns_file"] = args.campaigns
    if args.clock is not None:
        overrides["clock"] = args.clock
    settings = Settings.load(**overrides)
    from processors.metrics import MetricsServerError, start_metrics_server

    try:
        check_topics(settings)
        app, shell = build(settings)
        start_metrics_server(settings.metrics_port)  # a daemon thread: dies with the worker
    except (WorkerSetupError, MetricsServerError) as exc:
        print(f"nudgeflow worker: {exc}", file=sys.stderr)
        return 2
    loglevel = args.loglevel or {"warning": "warn"}.get(str(settings.log_level), settings.log_level)
    loglevel = loglevel or "warn"
    show_status(loglevel).info(
        "worker %s (consumer group %s): clickstream %s (%d partitions) -> %s, dead letters %s,"
        " ticks %s; campaigns loaded: %d enabled; clock %s",
        settings.worker_id,
        app.conf.id,
        settings.topic_clickstream,
        settings.partitions,
        settings.topic_decisions,
        settings.topic_clickstream_dlq,
        settings.topic_ticks,
        len(shell.campaign_ids),
        settings.clock,
    )
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust's terminal spinner writes escape codes into logs and, while it is on, sets the root
    # logger to DEBUG (every aiokafka debug record gets built): we want neither.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
