"""The state the policy needs, as a protocol: ``RedisStore`` (shared, atomic) and
``InMemoryStore`` (backtests, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from processors.core.cap import CapRule
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy.requests import CallPermit, Prior


class PolicyStore(Protocol):
    """State the policy needs; ``RedisStore`` (shared, atomic) and ``InMemoryStore`` (backtest).

    Every method that decides something (``begin``, ``check_caps``, ``cancel``, ``claim_due``,
    ``start_call``) must be atomic: several dispatchers share one store.
    """

    def contact(self, user_id: str, as_of: int | None = None) -> Contact | None: ...

    def begin(self, decision: Decision, token: str, resume_deferred: bool) -> Prior:
        """Reserve ``decision`` for this attempt (``token``).

        Absent -> ``reserved`` (returns ``new``); ``reserved`` -> re-reserved (a previous
        attempt crashed before calling the gateway; returns ``reserved``); ``deferred`` with
        ``resume_deferred`` -> ``reserved`` (returns ``deferred``). ``token`` then owns the
        decision; so it does when ``calling`` or an unpublished outcome is returned (the previous
        owner's lease ran out). Any other state is returned unchanged, except ``busy``: another
        instance is calling the gateway for this decision, or has recorded its outcome and not
        yet published it, and its lease has not run out (a duplicate delivered to two instances
        at once, not a crash): ask again after ``wait_ms``.
        """
        ...

    def cancellation(self, decision: Decision, as_of: int | None = None) -> str | None:
        """Reason of a ``DecisionCancelled`` seen for this decision, if any (with ``as_of``:
        only one whose time is not after ``as_of`` — event-clock replays)."""
        ...

    def cancel(
        self, cancel: DecisionCancelled, outcome: SmsOutcome, event_clock: bool = False
    ) -> bool:
        """Remember the cancellation; if the decision is deferred, drop it and record ``outcome``
        (returns True: the caller publishes it). Otherwise step 3 / ``start_call`` will see it."""
        ...

    def check_caps(
        self,
        decision: Decision,
        rules: Sequence[CapRule],
        now_ms: int,
        reserve: bool,
    ) -> int | None:
        """Index of the first violated rule, else None; when None and ``reserve``, record a send
        at ``now_ms`` for this decision. A decision that already holds a reservation passes."""
        ...

    def release_caps(self, decision: Decision) -> None:
        """Forget this decision's send reservation, cap slots and first-text claim alike (the
        text did not go out)."""
        ...

    def claim_first_text(self, decision: Decision) -> bool:
        """Atomically claim "first text to this contact" for ``decision`` (the STOP footer goes
        on it); True also when this decision already holds the claim."""
        ...

    def defer(self, decision: Decision, due_ms: int, outcome: SmsOutcome, token: str) -> bool:
        """Hold the decision until ``due_ms``; False (nothing recorded) if ``token`` no longer
        owns it."""
        ...

    def claim_due(self, now_ms: int | None, limit: int) -> list[tuple[Decision, int]]:
        """Deferred decisions due at ``now_ms`` (all when None), earliest first, with their due
        times; each is claimed for this caller until ``finish`` (or a lease expires)."""
        ...

    def start_call(self, decision: Decision, token: str, as_of: int | None = None) -> CallPermit:
        """Right before the gateway call: ``ok`` (state is now ``calling``), ``lost`` (another
        attempt took the decision over) or ``cancelled:<reason>``."""
        ...

    def finish(
        self,
        decision: Decision,
        outcome: SmsOutcome,
        sent: bool,
        token: str,
        dead_letter: bool = False,
    ) -> bool:
        """Record the final outcome and release a deferred claim; False (nothing recorded) if
        ``token`` no longer owns the decision: the owner publishes, not us. ``dead_letter``: the
        outcome goes to the DLQ too (``begin`` returns it, so a redelivery re-produces both)."""
        ...

    def mark_emitted(self, decision: Decision, status: str) -> None:
        """The outcome with ``status`` is published (it need not be re-emitted on redelivery)."""
        ...
