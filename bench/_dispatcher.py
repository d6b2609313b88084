"""A ``nudgeflow dispatcher`` process whose gateway is :class:`_common.FakeGateway`.

Settings come from ``NUDGEFLOW_*`` as usual; ``BENCH_GATEWAY_LATENCY_S`` (default 0.02) and
``BENCH_ARRIVALS`` (where to write the gateway's arrival times at exit) configure the fake.
SIGTERM stops it cleanly. Bench-only (``bench/run.py`` skips ``_*`` files).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from _common import FakeGateway

from processors.core.campaign import load_campaigns
from processors.dispatcher import Dispatcher
from processors.settings import Settings


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    settings = Settings.load()
    out = os.environ.get("BENCH_ARRIVALS")
    gateway = FakeGateway(
        float(os.environ.get("BENCH_GATEWAY_LATENCY_S", "0.02")), Path(out) if out else None
    )
    dispatcher = Dispatcher(
        settings,
        load_campaigns(settings.campaigns_file),
        gateway,
        rate_per_s=float(os.environ.get("BENCH_RATE", "30")),
    )
    signal.signal(signal.SIGTERM, lambda _s, _f: dispatcher.stop())
    signal.signal(signal.SIGINT, lambda _s, _f: dispatcher.stop())
    dispatcher.run()
    return 1 if dispatcher.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
