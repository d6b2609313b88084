"""What both peers share: the two triggers' parameters, the Avro decoding of the clickstream
topic (the same ``Codec.decode`` as the raw baseline and the worker) and the rate meter."""

from __future__ import annotations

import argparse
import json
import time

CART_AFTER_MS = 30 * 60_000  # add_to_cart not followed by purchase within 30 min
VIEWS = 3  # product_view of one product...
VIEWS_WITHIN_MS = 3_600_000  # ...within 1 h


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--result", required=True, help="the figures go to this JSON file")
    return parser.parse_args()


class Meter:
    """Events/s from the first event seen to the ``expected``-th (start-up left out, as the
    raw baseline and the worker's figure leave it out), and how many each trigger fired."""

    def __init__(self, expected: int, result: str) -> None:
        self.expected = expected
        self.result = result
        self.seen = 0
        self.started = 0.0
        self.cpu_started = 0.0
        self.fired = {"cart": 0, "views": 0}

    def tick(self) -> bool:
        """Count one event; True once every expected event was seen."""
        self.seen += 1
        if self.seen == 1:
            self.started = time.perf_counter()
            self.cpu_started = time.process_time()
        return self.seen >= self.expected

    def report(self) -> None:
        elapsed = time.perf_counter() - self.started
        cpu = time.process_time() - self.cpu_started
        counted = self.seen - 1
        out = {
            "events_per_s": counted / elapsed if elapsed > 0 else 0.0,
            "events_per_cpu_s": counted / cpu if cpu > 0 else 0.0,
            "seen": self.seen,
            **{f"fired_{k}": v for k, v in self.fired.items()},
        }
        # a file, not stdout: Faust's worker sends stdout to its log
        with open(self.result, "w") as f:
            json.dump(out, f)
