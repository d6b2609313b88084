"""Python's cyclic garbage collector in a long-running NudgeFlow process (worker, dispatcher).

What a process has loaded once it is built (libraries, campaigns, templates, codecs, clients)
lives as long as the process: :func:`settle_collector` frees what is garbage by then, freezes the
rest out of the collector's passes and makes the young passes rarer (the hot paths make many
short-lived objects). Process-wide: never call it in a process that runs other work (tests).
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (20_000, 20, 20)
"""The collector's thresholds in a worker or dispatcher process: fewer generation-0 passes."""


def settle_collector(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Collect, freeze everything alive now, and set ``thresholds``."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
