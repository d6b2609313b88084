"""Compatibility import path: control records live in :mod:`processors.kafka.control`."""

from processors.kafka.control import (
    CONTROL_HEADER,
    FLUSH,
    SOURCE_HEADER,
    SOURCES_HEADER,
    FlushTracker,
    flush_headers,
    is_control,
)
from processors.kafka.headers import header

__all__ = [
    "CONTROL_HEADER",
    "FLUSH",
    "SOURCE_HEADER",
    "SOURCES_HEADER",
    "FlushTracker",
    "flush_headers",
    "header",
    "is_control",
]
