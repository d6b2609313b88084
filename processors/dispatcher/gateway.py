"""The gateway the settings name."""

from __future__ import annotations

import sys

from processors.gateways.base import Gateway
from processors.settings import Settings


def make_gateway(settings: Settings) -> Gateway:
    """The gateway ``settings.gateway`` names (``outbox`` or ``vonage``)."""
    if settings.gateway == "outbox":
        from processors.gateways.outbox import OutboxGateway

        # The console echo shows each text: on a terminal only. Redirected, stdout is a log
        # (e.g. the demo's logs/dispatcher.log), and texts never go into logs.
        echo = print if sys.stdout.isatty() else None
        return OutboxGateway(settings.outbox_path, echo=echo)
    from processors.gateways.vonage import VonageGateway

    if settings.vonage_api_key is None or settings.vonage_api_secret is None:
        raise ValueError(
            "the vonage gateway needs NUDGEFLOW_VONAGE_API_KEY and NUDGEFLOW_VONAGE_API_SECRET"
        )
    return VonageGateway(
        settings.vonage_api_key,
        settings.vonage_api_secret,
        settings.vonage_from,
        rest_host=settings.vonage_rest_host,
        timeout_s=settings.vonage_timeout_s,
    )
