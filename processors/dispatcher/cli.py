"""``nudgeflow dispatcher``: its options, and running one instance until a signal."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from processors import arguments, metrics
from processors.collector import settle_collector
from processors.core.campaign import CampaignError, load_campaigns
from processors.core.policy import RetryPolicy
from processors.dispatcher.gateway import make_gateway
from processors.dispatcher.service import DEFAULT_RATE_PER_S, Dispatcher
from processors.redis import DEFAULT_PREFIX
from processors.settings import Settings

log = logging.getLogger("nudgeflow.dispatcher")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--campaigns", type=Path, help="campaign file (default: NUDGEFLOW_CAMPAIGNS_FILE)"
    )
    parser.add_argument(
        "--rate",
        type=arguments.positive_rate,
        default=DEFAULT_RATE_PER_S,
        help="gateway requests per second, shared by all instances (default 30, Vonage's limit)",
    )
    parser.add_argument("--threads", type=int, default=8, help="gateway call threads")
    parser.add_argument("--max-in-flight", type=int, default=64, help="sends in progress at most")
    parser.add_argument(
        "--retries", type=int, default=5, help="attempts per text on retryable errors"
    )
    parser.add_argument(
        "--retry-base", type=float, default=0.5, help="first retry backoff in seconds"
    )
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="Redis key prefix")


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    arguments.configure_logging(settings.log_level)
    try:
        campaigns = load_campaigns(args.campaigns or settings.campaigns_file)
    except CampaignError as exc:
        print(f"nudgeflow dispatcher: {exc}", file=sys.stderr)
        return 2
    try:
        gateway = make_gateway(settings)
    except ValueError as exc:
        print(f"nudgeflow dispatcher: {exc}", file=sys.stderr)
        return 2
    dispatcher = Dispatcher(
        settings,
        campaigns,
        gateway,
        key_prefix=args.key_prefix,
        rate_per_s=args.rate,
        threads=args.threads,
        max_in_flight=args.max_in_flight,
        retry=RetryPolicy(attempts=args.retries, base_s=args.retry_base),
    )

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing in-flight sends and stopping", signum)
        dispatcher.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        metrics.start_metrics_server(settings.metrics_port)  # 0 = off (dev profile default)
    except metrics.MetricsServerError as exc:
        print(f"nudgeflow dispatcher: {exc}", file=sys.stderr)
        return 2
    log.info(
        "dispatcher: group %s, topic %s, gateway %s, clock %s",
        settings.dispatcher_group,
        settings.topic_decisions,
        gateway.name,
        settings.clock,
    )
    settle_collector()
    dispatcher.run()
    return 1 if dispatcher.error is not None else 0
