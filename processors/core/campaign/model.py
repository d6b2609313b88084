"""The campaign model: triggers, audience, message and variants, as the campaign file defines them.

Immutable values; :mod:`.parse` builds them from YAML and is the only place that validates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from processors.core.cap import CapRule
from processors.core.quiet_hours import QuietHours

DEFAULT_MAX_DEFER_MS = 12 * 3_600_000
DEFAULT_MAX_SEGMENTS = 2
MAX_SEGMENTS_LIMIT = 10  # Vonage concatenates up to ~10 parts reliably; more is a mistake
DEFAULT_CONVERSION: frozenset[str] = frozenset({"purchase"})
DEFAULT_AFTER_SEND_MS = 24 * 3_600_000  # a conversion within 24 h of a text counts for it
DEFAULT_AFTER_CLICK_MS = 5 * 86_400_000  # ... or within 5 days of a click on its link

TEMPLATE_NAMES: frozenset[str] = frozenset(
    {"first_name", "locale", "timezone", "user_id", "campaign_id", "variant", "stage"}
    | {"properties", "attributes"}
)
"""Variables every render has (contact, decision, campaign). Trigger-event properties and
contact attributes are also available by name, but may be missing: a template that uses one
must give a fallback with ``| default(...)`` (or test ``is defined``), checked at load time."""


class CampaignError(ValueError):
    """An invalid campaign file; the message names the campaign and the field."""


@dataclass(frozen=True, slots=True)
class AbsenceTrigger:
    """A ``start`` event not followed by a ``cancel`` event within ``after``."""

    start: frozenset[str]
    cancel: frozenset[str]
    after_ms: int
    where: dict[str, str] = field(default_factory=dict)
    type: str = "absence"


@dataclass(frozen=True, slots=True)
class RepeatTrigger:
    """``count`` matching events within ``within`` (per ``group_by`` value when set)."""

    event: str
    count: int
    within_ms: int
    cooldown_ms: int
    delay_ms: int = 0
    group_by: str | None = None
    where: dict[str, str] = field(default_factory=dict)
    type: str = "repeat"


@dataclass(frozen=True, slots=True)
class EventTrigger:
    """Each matching event, at once or after ``delay`` / ``before`` a time in a property."""

    event: str
    delay_ms: int = 0
    wait_until: str | None = None
    before_ms: int = 0
    cancel: frozenset[str] = frozenset()
    cooldown_ms: int = 0
    where: dict[str, str] = field(default_factory=dict)
    type: str = "event"


Trigger = AbsenceTrigger | RepeatTrigger | EventTrigger


@dataclass(frozen=True, slots=True)
class Audience:
    """Journey-stage condition evaluated at fire time (see ``processors.core.segment``)."""

    stage: str | None = None
    days: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    template: str
    footer: str | None = "Reply STOP to opt out"


@dataclass(frozen=True, slots=True)
class Variant:
    """A copy or send-timing variant: overrides the trigger's timing and/or the message."""

    id: str
    weight: int
    trigger: Trigger
    message: Message


@dataclass(frozen=True, slots=True)
class AttributionWindows:
    """How long after a text (or a click on its link) a conversion still counts for it."""

    after_send_ms: int = DEFAULT_AFTER_SEND_MS
    after_click_ms: int = DEFAULT_AFTER_CLICK_MS


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    trigger: Trigger
    message: Message
    enabled: bool = True
    priority: int = 0
    audience: Audience | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    caps: tuple[CapRule, ...] = ()
    quiet_hours: QuietHours | None = None  # None: the file's top-level quiet hours apply
    max_defer_ms: int = DEFAULT_MAX_DEFER_MS
    max_segments: int = DEFAULT_MAX_SEGMENTS
    variants: tuple[Variant, ...] = ()
    holdout: float = 0.0  # share of users (0..1) kept as a control group: decided, never sent
    conversion: frozenset[str] | None = None  # None: the trigger's cancel events, else purchase
    attribution: AttributionWindows = field(default_factory=AttributionWindows)

    @property
    def conversion_events(self) -> frozenset[str]:
        """Event types that count as a conversion for this campaign's texts."""
        if self.conversion is not None:
            return self.conversion
        return getattr(self.trigger, "cancel", frozenset()) or DEFAULT_CONVERSION

    @property
    def event_types(self) -> frozenset[str]:
        """Every event type this campaign reacts to."""
        t = self.trigger
        if isinstance(t, AbsenceTrigger):
            return t.start | t.cancel
        if isinstance(t, EventTrigger):
            return frozenset({t.event}) | t.cancel
        return frozenset({t.event})


@dataclass(frozen=True, slots=True)
class CampaignSet:
    campaigns: tuple[Campaign, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    caps: tuple[CapRule, ...] | None = None  # None: no top-level ``caps:`` key in the file
    quiet_hours: QuietHours = field(default_factory=QuietHours)

    @property
    def enabled(self) -> tuple[Campaign, ...]:
        return tuple(c for c in self.campaigns if c.enabled)

    def get(self, campaign_id: str) -> Campaign | None:
        return next((c for c in self.campaigns if c.id == campaign_id), None)

    @property
    def event_types(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for c in self.enabled:
            out |= c.event_types
        return out
