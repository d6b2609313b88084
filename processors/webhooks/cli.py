"""``nudgeflow webhooks``: its options, and serving until a signal."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from processors import arguments
from processors.kafka.admin import ensure_topics
from processors.redis import DEFAULT_PREFIX
from processors.settings import Settings
from processors.webhooks.app import WebhookService

log = logging.getLogger("nudgeflow.webhooks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default: NUDGEFLOW_WEBHOOK_HOST)")
    parser.add_argument("--port", type=int, help="listen port (default: NUDGEFLOW_WEBHOOK_PORT)")
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="Redis key prefix")
    parser.add_argument(
        "--rate",
        type=arguments.positive_rate,
        default=30.0,
        help="gateway requests/s shared with the dispatcher",
    )
    parser.add_argument(
        "--create-topics",
        action="store_true",
        help="create sms-delivery / sms-inbound if missing (always on with the dev profile)",
    )


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    arguments.configure_logging(settings.log_level)
    secret = settings.webhook_signature_secret
    if (secret is None or not secret.get_secret_value()) and settings.profile != "dev":
        # Unsigned webhooks in production would let anyone opt numbers in or out.
        print(
            "nudgeflow webhooks: NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET (or _FILE) is required "
            "outside the dev profile",
            file=sys.stderr,
        )
        return 2
    if args.create_topics or settings.profile == "dev":
        ensure_topics(settings, [settings.topic_delivery, settings.topic_inbound])
    from processors.dispatcher import make_gateway

    try:
        gateway = make_gateway(settings)
        service = WebhookService(
            settings, gateway, key_prefix=args.key_prefix, rate_per_s=args.rate
        )
    except ValueError as exc:
        print(f"nudgeflow webhooks: {exc}", file=sys.stderr)
        return 2
    if service.verifier is None:
        log.warning("no NUDGEFLOW_WEBHOOK_SIGNATURE_SECRET: webhooks are accepted unsigned")
    host = args.host or settings.webhook_host
    port = args.port if args.port is not None else settings.webhook_port
    log.info("webhooks on %s:%d (signed: %s)", host, port, service.verifier is not None)
    web.run_app(
        service.app(),
        host=host,
        port=port,
        access_log=None,
        print=None,
        handle_signals=True,
    )
    if service.follower.error is not None:
        return 1
    return 0
