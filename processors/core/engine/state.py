"""The engine's per-user state as named, typed records.

A user's state is a committed :class:`Core` (every event before the user's watermark applied),
the *tail* (accepted events at or after it, in ``(ts, arrival)`` order), a *head* core (the
committed core with the tail applied; None when the tail is empty), the event ids seen (for
de-duplication) and the decisions and exits emitted from the head but not yet committed. Its
bytes (the ``user_state`` table) are :mod:`processors.core.engine.state_format`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from processors.core.decision import Decision, DecisionCancelled
from processors.core.events import ClickEvent
from processors.core.segment import Facts
from processors.core.trigger import CampaignState

NEVER = -(2**62)  # a watermark or timestamp before every event


@dataclass(slots=True)
class Core:
    """Journey facts, the state of every campaign that holds any, and each campaign's next
    timer (``deadlines``, kept equal to ``CampaignState.next_deadline`` so timers are found
    without a scan)."""

    facts: Facts = field(default_factory=Facts)
    campaigns: dict[str, CampaignState] = field(default_factory=dict)
    deadlines: dict[str, int] = field(default_factory=dict)

    def clone(self) -> Core:
        """A deep copy (immutable parts shared)."""
        return Core(
            self.facts.clone(),
            {cid: cs.clone() for cid, cs in self.campaigns.items()},
            dict(self.deadlines),
        )

    def is_new(self) -> bool:
        """No event applied yet."""
        return self.facts.last_seen is None and not self.campaigns and not self.deadlines


@dataclass(slots=True)
class TailEntry:
    """An accepted event not yet committed; ``seq`` orders events of equal ts by arrival."""

    ts: int
    seq: int
    event: ClickEvent


@dataclass(slots=True)
class Speculation:
    """A decision (or exit) emitted from the head and not yet committed: its campaign, and the
    decision's trigger ts (the exit's ts)."""

    campaign_id: str
    at: int


@dataclass(slots=True)
class UserState:
    user_id: str
    wm: int = NEVER  # committed watermark
    max_ts: int = NEVER
    seq: int = 0
    committed: Core = field(default_factory=Core)
    head: Core | None = None  # None when the tail is empty (head == committed)
    tail: list[TailEntry] = field(default_factory=list)  # sorted by (ts, seq)
    seen: dict[str, int] = field(default_factory=dict)  # event_id -> ts (de-duplication)
    # emitted, not yet committed: decision id -> the immediate decision; EXIT + decision id ->
    # an exit
    spec: dict[str, Speculation] = field(default_factory=dict)
    # Not stored (a decoded state starts False): the head is the committed core with the tail
    # applied in order and applying it dropped nothing the commit would emit (a timer decision,
    # a cancellation, an audience filter), so committing the whole tail can take the head
    # instead of replaying the tail (Engine._commit).
    quiet: bool = field(default=False, compare=False, repr=False)

    def open_campaigns(self) -> list[str]:
        """Campaigns with a pending timer (an open episode or a delayed firing) once the tail is
        applied (the head state): a cart counts as open as soon as its event is accepted."""
        core = self.head if self.head is not None else self.committed
        return list(core.deadlines)

    def to_bytes(self) -> bytes:
        """The state's bytes in the current format (:func:`state_format.encode_state`)."""
        from processors.core.engine.state_format import encode_state

        return encode_state(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        """Any format :meth:`to_bytes` ever wrote; ``StateFormatError`` if unreadable."""
        from processors.core.engine.state_format import decode_state

        return decode_state(data)


@dataclass(slots=True)
class Step:
    """What one engine call produced. ``state`` None means: delete the user's state."""

    state: UserState | None
    decisions: list[Decision] = field(default_factory=list)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    rejected: list[tuple[ClickEvent, str]] = field(default_factory=list)
    filtered: list[tuple[str, str]] = field(default_factory=list)  # (campaign, reason)
    wake_at: int | None = None
