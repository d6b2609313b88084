"""A dispatcher process takes what it loaded at start-up out of the cyclic collector's passes
(their full passes over every library object were ~15% of its decision loop)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from processors.collector import GC_THRESHOLDS, settle_collector
assert gc.get_freeze_count() == 0
settle_collector()
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert gc.get_threshold() == GC_THRESHOLDS
assert gc.isenabled()
print("ok")
"""


def test_settle_collector_freezes_what_is_loaded_and_keeps_collecting() -> None:
    # in a process of its own: the freeze and the thresholds are process-wide
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
