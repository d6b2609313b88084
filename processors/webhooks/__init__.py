"""``nudgeflow webhooks``: what comes back from handsets and the gateway, into Kafka and Redis.

An aiohttp service (:mod:`.app`) with one module per kind of callback: delivery receipts
(:mod:`.delivery`), inbound texts with STOP/HELP/START (:mod:`.inbound`) and short-link clicks
(:mod:`.clicks`); request parameters and Vonage's fields in :mod:`.params`, signatures in
:mod:`.signatures`, the service's Redis keys in :mod:`.state`, a background server for tests and
the demo in :mod:`.server`.

Request rules: bodies over ``webhook_max_body_bytes`` -> 413; unparseable or incomplete -> 400
(415 for a content type other than form or JSON); with a signature secret configured, a missing
or wrong ``sig`` or a ``timestamp`` off by more than the tolerance -> 401 and nothing changes.
Valid requests get 200 as soon as their effects are durable (Redis written, Kafka acknowledged);
confirmations are sent after the answer. Retries are idempotent: every receipt (message id +
status) and inbound message (message id) is claimed in Redis and marked done only after its
effects; a failure releases the claim and answers 503, so Vonage's retry does the work again.
"""

from processors.kafka.admin import ensure_topics
from processors.webhooks.app import DELIVERY_PATH, INBOUND_PATH, WebhookService
from processors.webhooks.cli import add_arguments, run
from processors.webhooks.errors import SignatureError, WebhookError
from processors.webhooks.inbound import (
    InboundAction,
    Replies,
    apply_inbound,
    reply_client_ref,
)
from processors.webhooks.params import (
    Inbound,
    Receipt,
    normalize_msisdn,
    parse_inbound,
    parse_receipt,
    read_params,
)
from processors.webhooks.server import BackgroundServer
from processors.webhooks.signatures import SignatureVerifier, sign_params

__all__ = [
    "DELIVERY_PATH",
    "INBOUND_PATH",
    "BackgroundServer",
    "Inbound",
    "InboundAction",
    "Receipt",
    "Replies",
    "SignatureError",
    "SignatureVerifier",
    "WebhookError",
    "WebhookService",
    "add_arguments",
    "apply_inbound",
    "ensure_topics",
    "normalize_msisdn",
    "parse_inbound",
    "parse_receipt",
    "read_params",
    "reply_client_ref",
    "run",
    "sign_params",
]
