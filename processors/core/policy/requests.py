"""What the policy's steps return: a :class:`Step` (done: publish, maybe send) or a request for
one store operation, whose answer :meth:`PolicySteps.advance` turns into the next one.

Each request names exactly one ``PolicyStore`` call (``Final`` with ``release``: two, in order),
so a reader sees every read and write the policy makes, and a shell may run the ``Final`` and
``CapCheck`` requests of many decisions in one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from processors.core.campaign import Campaign
from processors.core.cap import CapRule
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.quiet_hours import QuietHours
from processors.core.sms import SmsMessage

PriorState = Literal["new", "reserved", "deferred", "calling", "done", "busy"]
CallPermit = Literal["ok", "lost"] | str  # or "cancelled:<reason>"

UNKNOWN_AFTER_CRASH = "unknown_after_crash"


@dataclass(frozen=True, slots=True)
class Prior:
    """What the store knew about a decision id when it was reserved (step 1)."""

    state: PriorState
    outcome: SmsOutcome | None = None  # last recorded outcome (deferred or final)
    emitted: bool = False  # whether that outcome has been published
    wait_ms: int = 0  # busy: another live attempt holds the decision for this long
    dead_letter: bool = False  # the recorded outcome was dead-lettered (re-produce with it)


@dataclass(frozen=True, slots=True)
class Prefetched:
    """The reads of steps 2-3: contact (keyword consent applied) and cancellation reason."""

    contact: Contact | None
    cancellation: str | None


@dataclass(frozen=True, slots=True)
class SendPlan:
    """A text the policy approved; the shell rate-limits and calls the gateway with it."""

    decision: Decision
    token: str
    message: SmsMessage
    now_ms: int


@dataclass(slots=True)
class Step:
    """What to publish now, and possibly a send for the shell to perform."""

    outcomes: list[SmsOutcome] = field(default_factory=list)
    send: SendPlan | None = None
    dead_letter: tuple[Decision, str] | None = None  # (decision, reason) for the DLQ topic
    retry_after_ms: int | None = None  # undecided (busy elsewhere): call on_decision again


@dataclass(frozen=True, slots=True)
class Read:
    """Read the contact and the cancellation (``contact``, ``cancellation``; as of ``now_ms``
    with the event clock). Answer: :class:`Prefetched`."""

    decision: Decision
    token: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class Final:
    """Record a final outcome (``finish``; first ``release_caps`` when ``release``). Answer:
    whether it was recorded; only a recorded outcome is published."""

    decision: Decision
    token: str
    outcome: SmsOutcome
    dead_letter: bool = False
    release: bool = False  # the text did not go out: give its cap slots back first
    sent: bool = False


@dataclass(frozen=True, slots=True)
class CapCheck:
    """Step 4: check ``rules`` (``check_caps``, reserving a slot when ``reserve``). Answer: the
    index of the first violated rule, or None. ``capped_by(i)`` is the outcome when rule ``i``
    is violated (``suppressed: frequency_cap`` with ``rule_keys[i]`` as its rule)."""

    decision: Decision
    token: str
    now_ms: int
    rules: tuple[CapRule, ...]
    reserve: bool
    capped: SmsOutcome
    rule_keys: tuple[str, ...]
    campaign: Campaign
    contact: Contact
    quiet: QuietHours
    until: int | None

    def capped_by(self, rule: int) -> SmsOutcome:
        c = self.capped  # built by the steps' _outcome: these fields only (replace() is slow)
        return SmsOutcome(
            c.decision_id,
            c.campaign_id,
            c.user_id,
            c.status,
            c.at,
            reason=c.reason,
            variant=c.variant,
            rule=self.rule_keys[rule],
        )


@dataclass(frozen=True, slots=True)
class Defer:
    """Step 5: hold the decision until ``due_ms`` (``defer``). Answer: whether it was held."""

    decision: Decision
    token: str
    due_ms: int
    outcome: SmsOutcome


@dataclass(frozen=True, slots=True)
class FirstText:
    """Step 6, before rendering: claim "first text to this contact" (``claim_first_text``; the
    STOP footer goes on it). Answer: whether this decision holds the claim."""

    check: CapCheck


@dataclass(frozen=True, slots=True)
class Cancel:
    """Remember a cancellation (``cancel``). Answer: whether it dropped a deferred send."""

    cancel: DecisionCancelled
    outcome: SmsOutcome


@dataclass(frozen=True, slots=True)
class CallGate:
    """Right before the gateway call (``start_call``). Answer: the :data:`CallPermit`; ``ok``
    advances to the plan itself (call the gateway)."""

    plan: SendPlan


Request = Read | Final | CapCheck | Defer | FirstText | Cancel | CallGate
"""A store operation the policy needs before it can go on."""

Pending = Step | Request
"""What a step returns: done (a ``Step``), or a request to answer."""
