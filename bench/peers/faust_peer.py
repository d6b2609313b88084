"""The two triggers as a Faust agent with tables, the way Faust's documentation teaches them: an
agent iterating over the topic's ``(key, value)`` items (raw bytes, decoded with the same Avro
codec as the raw baseline), and ``Table``\\s (changelog-backed, keyed by user) for the open carts
and the recent product views.

Cart abandonment: an open cart per user; a ``purchase`` closes it; the first event of the user
at least 30 min after the cart fires it (no timers: a Faust ``timer`` runs on wall-clock time and
would have to scan the table). Product views: the view times per user and product in the last
hour; the third fires. docs/performance.md says what this gets right and wrong.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[2]))

import faust  # noqa: E402
from shared import (  # noqa: E402
    CART_AFTER_MS,
    VIEWS,
    VIEWS_WITHIN_MS,
    Meter,
    parse_args,
)

from schemas.codec import Codec  # noqa: E402


def main() -> int:
    args = parse_args()
    meter = Meter(args.expected, args.result)
    decode = Codec(args.registry).decode
    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        store="memory://",
        topic_partitions=args.partitions,
        datadir=args.state_dir,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    clicks = app.topic(args.topic, key_type=bytes, value_type=bytes, value_serializer="raw")
    carts = app.Table("carts", default=int)  # user -> ts of the open cart (0: none)
    views = app.Table("views", default=list)  # "user|product" -> view times in the last hour

    @app.agent(clicks)
    async def triggers(stream: Any) -> None:
        async for key, value in stream.items():
            _name, event = decode(value)
            user, ts, kind = key.decode(), event["ts"], event["event_type"]
            opened = carts[user]
            if opened and ts - opened >= CART_AFTER_MS:
                meter.fired["cart"] += 1
                opened = 0
                carts[user] = 0
            if kind == "add_to_cart" and not opened:
                carts[user] = ts
            elif kind == "purchase" and opened:
                carts[user] = 0
            if kind == "product_view":
                product = (event.get("properties") or {}).get("product_id")
                if product is not None:
                    k = f"{user}|{product}"
                    seen = [t for t in views[k] if t > ts - VIEWS_WITHIN_MS]
                    seen.append(ts)
                    if len(seen) >= VIEWS:
                        meter.fired["views"] += 1
                        seen = []
                    views[k] = seen
            if meter.tick():
                meter.report()
                os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful stop

    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
