"""The per-user trigger engine (:mod:`.engine`), its typed state (:mod:`.state`) and the bytes
of that state (:mod:`.state_format`)."""

from processors.core.engine.engine import (
    DEDUP_WINDOW_MS,
    DEFAULT_STATE_TTL_MS,
    EXIT,
    FLUSH_MS,
    Engine,
    flush_all,
)
from processors.core.engine.state import Core, Speculation, Step, TailEntry, UserState
from processors.core.engine.state_format import COMPRESS_MIN, StateFormatError

__all__ = [
    "COMPRESS_MIN",
    "DEDUP_WINDOW_MS",
    "DEFAULT_STATE_TTL_MS",
    "EXIT",
    "FLUSH_MS",
    "Core",
    "Engine",
    "Speculation",
    "StateFormatError",
    "Step",
    "TailEntry",
    "UserState",
    "flush_all",
]
