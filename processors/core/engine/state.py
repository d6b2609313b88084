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


@dataclass(slots=True, init=False)
class Core:
    """Journey facts, the state of every campaign that holds any, and each campaign's next
    timer (``deadlines``, kept equal to ``CampaignState.next_deadline`` so timers are found
    without a scan)."""

    facts: Facts = field(default_factory=Facts)
    campaigns: dict[str, CampaignState] = field(default_factory=dict)
    deadlines: dict[str, int] = field(default_factory=dict)

    def __init__(
        self,
        facts: Facts | None = None,
        campaigns: dict[str, CampaignState] | None = None,
        deadlines: dict[str, int] | None = None,
    ) -> None:
        self.facts = Facts() if facts is None else facts
        self.campaigns = {} if campaigns is None else campaigns
        self.deadlines = {} if deadlines is None else deadlines

    def clone(self) -> Core:
        """A copy whose changes never show in this core (nor this core's in it): the facts and
        the dicts are copied; the campaign states are shared, marked ``shared``, and copied by
        whichever core changes one first (:class:`~processors.core.engine.rules.Rules`)."""
        campaigns = self.campaigns
        for cs in campaigns.values():
            cs.shared = True
        return Core(self.facts.clone(), dict(campaigns), dict(self.deadlines))

    def is_new(self) -> bool:
        """No event applied yet."""
        return self.facts.last_seen is None and not self.campaigns and not self.deadlines


@dataclass(slots=True, init=False)
class TailEntry:
    """An accepted event not yet committed; ``seq`` orders events of equal ts by arrival."""

    ts: int
    seq: int
    event: ClickEvent

    def __init__(self, ts: int, seq: int, event: ClickEvent) -> None:
        self.ts = ts
        self.seq = seq
        self.event = event


@dataclass(slots=True, init=False)
class Speculation:
    """A decision (or exit) emitted from the head and not yet committed: its campaign, and the
    decision's trigger ts (the exit's ts)."""

    campaign_id: str
    at: int

    def __init__(self, campaign_id: str, at: int) -> None:
        self.campaign_id = campaign_id
        self.at = at


@dataclass(slots=True, init=False)
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

    def __init__(
        self,
        user_id: str,
        wm: int = NEVER,
        max_ts: int = NEVER,
        seq: int = 0,
        committed: Core | None = None,
        head: Core | None = None,
        tail: list[TailEntry] | None = None,
        seen: dict[str, int] | None = None,
        spec: dict[str, Speculation] | None = None,
        quiet: bool = False,
    ) -> None:
        self.user_id = user_id
        self.wm = wm
        self.max_ts = max_ts
        self.seq = seq
        self.committed = Core() if committed is None else committed
        self.head = head
        self.tail = [] if tail is None else tail
        self.seen = {} if seen is None else seen
        self.spec = {} if spec is None else spec
        self.quiet = quiet

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


@dataclass(slots=True, init=False)
class Step:
    """What one engine call produced. ``state`` None means: delete the user's state."""

    state: UserState | None
    decisions: list[Decision] = field(default_factory=list)
    cancellations: list[DecisionCancelled] = field(default_factory=list)
    rejected: list[tuple[ClickEvent, str]] = field(default_factory=list)
    filtered: list[tuple[str, str]] = field(default_factory=list)  # (campaign, reason)
    wake_at: int | None = None

    def __init__(
        self,
        state: UserState | None,
        decisions: list[Decision] | None = None,
        cancellations: list[DecisionCancelled] | None = None,
        rejected: list[tuple[ClickEvent, str]] | None = None,
        filtered: list[tuple[str, str]] | None = None,
        wake_at: int | None = None,
    ) -> None:
        self.state = state
        self.decisions = [] if decisions is None else decisions
        self.cancellations = [] if cancellations is None else cancellations
        self.rejected = [] if rejected is None else rejected
        self.filtered = [] if filtered is None else filtered
        self.wake_at = wake_at
