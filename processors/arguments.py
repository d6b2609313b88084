"""Command-line value types shared by the ``nudgeflow`` commands, so that a bad value is the
same clear argparse error (exit 2) everywhere instead of a traceback or a silent default; and
the one log format of the long-running commands."""

from __future__ import annotations

import argparse
import logging
import math
import sys

MAX_LINGER_MS = 900_000  # librdkafka's upper bound for linger.ms


def positive_rate(text: str) -> float:
    """``--rate``: a finite number of events or requests per second above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def linger_ms(text: str) -> int:
    """``--linger-ms``: a whole number of milliseconds librdkafka accepts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of milliseconds: {text!r}") from None
    if not 0 <= value <= MAX_LINGER_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_LINGER_MS}, got {value}")
    return value


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | None) -> None:
    """Log to stderr at ``level`` (``NUDGEFLOW_LOG_LEVEL``; default info)."""
    logging.basicConfig(level=(level or "info").upper(), format=LOG_FORMAT, stream=sys.stderr)
