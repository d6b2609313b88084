"""Clickstream intake: one pure function from a Kafka record to an event or a DLQ reason.

The worker's read loop (:mod:`streams.pipeline`) calls :func:`intake` for every clickstream
record and only adds I/O around it, so the fuzz tests run exactly the worker's decision path
without a broker. The contract: for any ``(key, value, headers)`` the result is a valid
:class:`~processors.core.events.ClickEvent`, :data:`END_OF_INPUT`, or a :class:`Rejected` with a
short machine-readable ``reason`` (the ``nudgeflow-dlq-reason`` header) and a log-safe
``detail``. Bad data never raises. The only exceptions that escape come from the schema registry
(network, 5xx): that is infrastructure, the worker retries instead of dead-lettering a good
record.

Reasons: ``unknown_control``; codec errors as snake case (``not_wire_format``,
``unknown_schema_id``, ``avro_decode_error``, ``wrong_record_type``); event validation errors
(``missing_user_id``, ``missing_event_id``, ``missing_event_type``, ``bad_user_id``, ...,
``ts_out_of_range``, ``oversized_properties``); ``invalid_event`` (a decoded record the event
model still refuses; should not happen with our schema) and ``key_mismatch``. Unknown event
types are *valid*: campaigns simply do not react to them. Duplicate event ids are valid here too:
the engine drops repeats per user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from processors.core.events import ClickEvent, EventError
from processors.kafka.control import CONTROL_HEADER, FLUSH
from processors.kafka.headers import header
from schemas.codec import Codec, CodecError, WrongRecordType

KEY_MISMATCH_DETAIL: Final = (
    "the record key is not the event's user_id (clickstream must be keyed by user_id so that "
    "each user's events share a partition)"
)
UNKNOWN_CONTROL_DETAIL: Final = f"{CONTROL_HEADER} header must be 'flush'"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record for the dead-letter topic (its original bytes go with it)."""

    reason: str
    detail: str
    event: ClickEvent | None = None  # the decoded event, when only the key was wrong
    control: bool = False  # a control record (not counted as a consumed event)


class EndOfInput:
    """The ``nudgeflow-control: flush`` record: commit the partition's pending timers."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_INPUT"


END_OF_INPUT: Final = EndOfInput()

Intake = ClickEvent | Rejected | EndOfInput


def reason_tag(exc: Exception) -> str:
    """``NotWireFormat`` -> ``not_wire_format``: the DLQ reason of a codec error."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def intake(codec: Codec, key: bytes | None, value: bytes | None, headers: Any = None) -> Intake:
    """Classify one clickstream record (see the module docstring for the contract).

    Order matters and mirrors what a reader of the DLQ expects: control header first, then the
    wire format and Avro body, then the event's own bounds, then the key.
    """
    if headers:  # most records have none
        control = header(headers, CONTROL_HEADER)
        if control == FLUSH:
            return END_OF_INPUT
        if control is not None:
            return Rejected("unknown_control", UNKNOWN_CONTROL_DETAIL, control=True)
    try:
        name, record = codec.decode(value)
        if name != "ClickEvent":
            raise WrongRecordType(f"expected a ClickEvent record, found {name}")
    except CodecError as exc:
        return Rejected(reason_tag(exc), str(exc))
    try:
        click = ClickEvent.from_record(record)
    except EventError as exc:
        return Rejected(exc.reason, exc.detail)
    except (KeyError, TypeError, ValueError) as exc:  # a writer schema we resolve but cannot use
        return Rejected(
            "invalid_event", f"decoded record is not a usable event: {type(exc).__name__}"
        )
    if key != click.user_id.encode():
        return Rejected("key_mismatch", KEY_MISMATCH_DETAIL, event=click)
    return click


__all__ = [
    "END_OF_INPUT",
    "KEY_MISMATCH_DETAIL",
    "EndOfInput",
    "Intake",
    "Rejected",
    "header",
    "intake",
    "reason_tag",
]
