"""The Lua scripts of every Redis operation that must be atomic, loaded from ``scripts/*.lua``.

Each file is one script; a script may begin with shared fragments (``now``: Redis' own clock in
ms; ``begin_fn``, ``finish_fn``: functions several scripts call), joined in the order
:data:`FRAGMENTS` gives. The files ship as package data (pyproject ``package-data``).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from processors.redis.client import Client

FRAGMENTS: dict[str, tuple[str, ...]] = {
    "begin": ("now", "begin_fn"),
    "prepare_many": ("now", "begin_fn"),
    "cancel": ("now",),
    "cancel_mark": ("now",),
    "defer": ("now",),
    "start_call": ("now",),
    "extend_call": ("now",),
    "finish": ("now", "finish_fn"),
    "settle_many": ("now",),
}


@functools.cache
def _read(name: str) -> str:
    return resources.files(__package__).joinpath("scripts", f"{name}.lua").read_text("utf-8")


@functools.cache
def source(name: str) -> str:
    """The full text of script ``name`` (its fragments first)."""
    return "\n".join(_read(part) for part in (*FRAGMENTS.get(name, ()), name))


def register(client: Client, name: str) -> Any:
    """Script ``name`` registered with ``client`` (called as ``script(keys=..., args=...)``)."""
    return client.register_script(source(name))
