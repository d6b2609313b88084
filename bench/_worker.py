"""``nudgeflow worker`` with the engine's state TTL taken from ``NUDGEFLOW_BENCH_STATE_TTL_MS``.

The memory soak needs idle users to be forgotten within the run; the state TTL has no setting
yet (the engine default is 30 days), so this launcher sets it on the engine the worker built.
Bench-only (``bench/run.py`` skips ``_*`` files).
"""

from __future__ import annotations

import argparse
import os
import sys

from streams import worker


def main() -> int:
    build = worker.build
    ttl_ms = os.environ.get("NUDGEFLOW_BENCH_STATE_TTL_MS")

    def build_with_ttl(settings):  # type: ignore[no-untyped-def]
        app, shell = build(settings)
        if ttl_ms:
            shell.engine.state_ttl_ms = int(ttl_ms)
        return app, shell

    worker.build = build_with_ttl  # type: ignore[assignment]
    return worker.run(argparse.Namespace(campaigns=None, clock=None, loglevel="warn"))


if __name__ == "__main__":
    sys.exit(main())
