"""The two triggers as a quixstreams application, the way its documentation teaches stateful
processing: one ``StreamingDataFrame`` over the topic (keyed by user), a value deserializer, the
message timestamp from the event's ``ts``, and a stateful ``apply`` per trigger whose state lives
in the application's state store (RocksDB, with its changelog topic).

Cart abandonment: an open cart is remembered per user; a ``purchase`` closes it; the first event
of the user at least 30 min after the cart (quixstreams has no timers) fires it. Product views:
the view times per product in the last hour; the third fires. docs/performance.md says what
this gets right and wrong against the worker's semantics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[2]))

from quixstreams import Application, State  # noqa: E402
from quixstreams.models.serializers import Deserializer  # noqa: E402
from shared import (  # noqa: E402
    CART_AFTER_MS,
    VIEWS,
    VIEWS_WITHIN_MS,
    Meter,
    parse_args,
)

from schemas.codec import Codec  # noqa: E402


class AvroValue(Deserializer):
    """The clickstream's Confluent-framed Avro records (the schema from the registry)."""

    def __init__(self, registry: str) -> None:
        super().__init__()
        self._decode = Codec(registry).decode

    def __call__(self, value: bytes, ctx: Any) -> Any:
        return self._decode(value)[1]


def main() -> int:
    args = parse_args()
    meter = Meter(args.expected, args.result)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        loglevel="WARNING",
    )
    topic = app.topic(
        args.topic,
        key_deserializer="str",
        value_deserializer=AvroValue(args.registry),
        timestamp_extractor=lambda value, headers, ts, ts_type: int(value["ts"]),
    )
    sdf = app.dataframe(topic)

    def cart(event: dict[str, Any], state: State) -> None:
        ts, kind = event["ts"], event["event_type"]
        opened = state.get("cart")
        if opened is not None and ts - opened >= CART_AFTER_MS:
            meter.fired["cart"] += 1  # no purchase within 30 min: the text would go now
            state.delete("cart")
            opened = None
        if kind == "add_to_cart":
            state.set("cart", ts if opened is None else opened)
        elif kind == "purchase" and opened is not None:
            state.delete("cart")

    def views(event: dict[str, Any], state: State) -> None:
        if event["event_type"] != "product_view":
            return
        product = (event.get("properties") or {}).get("product_id")
        if product is None:
            return
        ts = event["ts"]
        seen = [t for t in state.get(f"v:{product}", []) if t > ts - VIEWS_WITHIN_MS]
        seen.append(ts)
        if len(seen) >= VIEWS:
            meter.fired["views"] += 1
            seen = []
        state.set(f"v:{product}", seen)

    def count(_event: dict[str, Any]) -> None:
        if meter.tick():
            meter.report()
            app.stop()

    sdf = sdf.update(cart, stateful=True).update(views, stateful=True).update(count)
    app.run(sdf)
    return 0 if meter.seen >= args.expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
