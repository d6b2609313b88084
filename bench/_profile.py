"""Summaries of py-spy's ``--format raw`` (collapsed stacks) output, for docs/performance.md.

``python bench/_profile.py FILE [TOP]`` prints the share of samples per component (each sample
goes to the innermost frame that belongs to a known component), then the top functions by
inclusive and by self time. Not a benchmark (the leading underscore keeps ``bench/run.py`` from
running it).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# (component, substring of the frame's file path); the first match from the innermost frame wins.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("engine (processors/core)", "processors/core/"),
    ("intake + codec", "streams/intake.py"),
    ("intake + codec", "schemas/codec.py"),
    ("intake + codec", "fastavro"),
    ("metrics", "processors/metrics.py"),
    ("prometheus_client", "prometheus_client"),
    ("state format (json/orjson/lz4)", "json/"),
    ("worker shell (streams/)", "streams/"),
    ("faust tables/stores", "faust/tables"),
    ("faust tables/stores", "faust/stores"),
    ("faust stream + agent", "faust/streams"),
    ("faust stream + agent", "faust/agents"),
    ("faust stream + agent", "faust/channels"),
    ("faust consumer + conductor", "faust/transport/conductor"),
    ("faust consumer + conductor", "faust/transport/consumer"),
    ("faust producer", "faust/transport/producer"),
    ("faust producer", "faust/topics"),
    ("faust aiokafka driver", "faust/transport/drivers"),
    ("faust sensors", "faust/sensors"),
    ("faust other", "/faust/"),
    ("mode (services)", "/mode/"),
    ("aiokafka producer", "aiokafka/producer"),
    ("aiokafka consumer", "aiokafka/consumer"),
    ("aiokafka protocol/conn", "aiokafka/"),
    ("asyncio event loop", "asyncio/"),
    ("asyncio event loop", "uvloop"),
    ("asyncio event loop", "selectors.py"),
)
_LINE = re.compile(r":\d+\)$")


def summarize(path: Path, top: int = 25) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
        parts[next((c for f in reversed(frames) for c, p in COMPONENTS if p in f), "other")] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{total} samples", "-- by component (innermost known frame)"]
    out += [f"{100 * v / total:5.1f}%  {k}" for k, v in parts.most_common()]
    out.append("-- inclusive")
    out += [f"{100 * v / total:5.1f}%  {k[:150]}" for k, v in inclusive.most_common(top)]
    out.append("-- self")
    out += [f"{100 * v / total:5.1f}%  {k[:150]}" for k, v in own.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
