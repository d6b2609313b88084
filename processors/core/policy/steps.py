"""The dispatcher's ordered policy, as pure code over a small store protocol.

For every decision, in this order (issue 4):

1. Idempotency: the decision id is reserved before anything else. A reservation found in state
   ``calling`` (the gateway may have been called, the result never recorded: a crash) ends as
   ``failed: unknown_after_crash`` and the gateway is never called again. A decision that already
   has an outcome is not evaluated again (its outcome is re-emitted if it was never published).
2. Consent: ``opted_in`` only; ``opted_out`` / ``no_consent`` / ``no_contact`` are suppressed.
3. Exit conditions: a ``DecisionCancelled`` seen for the decision drops it (``cancelled``, with the
   cancellation's reason, e.g. ``converted``), also while deferred, and is checked once more,
   atomically, right before the gateway call.
4. Frequency caps: the file's top-level ``caps`` (or the cooldown default) plus the campaign's,
   checked and reserved in one atomic store operation (a Lua script in Redis).
5. Quiet hours in the recipient's zone: defer to their end (the store keeps a due-time index that
   survives restarts) or drop; a send that would go out more than ``max_defer`` after its
   ``fire_at`` is ``suppressed: stale``. When due, the send runs through steps 2-5 again.
6. Rendering: sandboxed template, segment limit, STOP footer on the first text to a contact.
7./8. Rate limit and gateway call happen in the shell (threads, Redis, network); the policy only
   says what to send (:class:`SendPlan`) and turns the gateway's answer into the outcome.

Times: ``now_ms`` is given by the caller. Live runs pass the wall clock; event-clock runs (replays,
backtest) pass the decision's ``fire_at`` and, for deferred sends, their due time, so quiet hours
and caps behave in a replay as they would have live.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

import jinja2

from processors.core import experiment
from processors.core.campaign import Campaign, CampaignSet
from processors.core.cap import GLOBAL_SCOPE, CapRule, rule_key
from processors.core.contact import Contact, resolve_timezone
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.quiet_hours import QuietHours, is_stale, quiet_until
from processors.core.rendering import TemplateError, compile_template, render_message
from processors.gateways.base import (
    AmbiguousGatewayError,
    GatewayError,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    SmsMessage,
)

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
class Final:
    """A final outcome to record (``PolicyStore.finish``); published only if it is recorded.

    The policy's steps return it instead of recording it themselves, so a shell can record the
    outcomes of many decisions in one round trip (:meth:`Policy.settle`)."""

    decision: Decision
    token: str
    outcome: SmsOutcome
    dead_letter: bool = False


@dataclass(frozen=True, slots=True)
class CapCheck:
    """Step 4 to do: check ``rules`` (reserving a slot when ``reserve``), then
    :meth:`Policy.after_caps`. ``capped_by(i)`` is the outcome when rule ``i`` is violated:
    ``capped`` (``suppressed: frequency_cap``) with ``rule_keys[i]`` as its rule."""

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
        c = self.capped  # built by Policy._outcome: these fields only (replace() is slow)
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
class Prefetched:
    """The reads of steps 2-3 (contact with keyword consent applied, cancellation reason),
    fetched by the caller together with ``begin`` (batches)."""

    contact: Contact | None
    cancellation: str | None


Pending = Step | Final | CapCheck
"""A step that may still need the store: :meth:`Policy.resolve` finishes it one call at a
time; a batching shell records Finals and checks caps for many decisions at once."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter for retryable gateway errors."""

    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 8.0

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Sleep before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        ceiling = min(self.max_s, self.base_s * (2**attempt))
        return (rng or random).uniform(ceiling / 2, ceiling)


def default_cap_rules(campaigns: CampaignSet, cooldown_ms: int) -> tuple[CapRule, ...]:
    """The file's top-level caps; without a ``caps:`` key, one text per cooldown per user."""
    if campaigns.caps is not None:
        return campaigns.caps
    if cooldown_ms <= 0:
        return ()
    return (CapRule(max=1, per_ms=cooldown_ms, scope=GLOBAL_SCOPE),)


def template_variables(
    decision: Decision, contact: Contact, campaign: Campaign
) -> dict[str, object]:
    """Render context: contact attributes and event properties by name, then the fixed fields.

    ``None`` values are left out so ``| default(...)`` applies to them.
    """
    fixed: dict[str, object | None] = {
        "first_name": contact.first_name,
        "locale": contact.locale,
        "timezone": contact.timezone,
        "user_id": decision.user_id,
        "campaign_id": campaign.id,
        "variant": decision.variant,
        "stage": decision.stage,
        "properties": dict(decision.properties),
        "attributes": dict(contact.attributes),
    }
    out: dict[str, object] = {**contact.attributes, **decision.properties}
    out.update({k: v for k, v in fixed.items() if v is not None})
    return out


class Policy:
    """The ordered policy; one instance per dispatcher (or backtest), not thread-safe except
    for :meth:`begin_call` and :meth:`complete`, which only touch the (thread-safe) store."""

    def __init__(
        self,
        campaigns: CampaignSet,
        store: PolicyStore,
        *,
        default_timezone: str = "UTC",
        cooldown_ms: int = 4 * 3_600_000,
        event_clock: bool = False,
    ) -> None:
        self.campaigns = campaigns
        self.store = store
        self.default_timezone = default_timezone
        self.event_clock = event_clock
        self.global_rules = default_cap_rules(campaigns, cooldown_ms)
        self._templates: dict[tuple[str, str | None], jinja2.Template] = {}
        for c in campaigns.campaigns:
            self._templates[(c.id, None)] = compile_template(c.message.template)
            for v in c.variants:
                self._templates[(c.id, v.id)] = compile_template(v.message.template)
        # per campaign: every cap rule that applies (file-wide first) and its outcome key
        self._rules: dict[str, tuple[tuple[CapRule, ...], tuple[str, ...]]] = {}
        for c in campaigns.campaigns:
            rules = (*self.global_rules, *c.caps)
            self._rules[c.id] = (rules, tuple(rule_key(rule) for rule in rules))
        self._open_minutes: set[tuple[QuietHours, ZoneInfo, int]] = set()
        self._by_id: dict[str, Campaign] = {}  # CampaignSet.get without its linear search
        for c in campaigns.campaigns:
            self._by_id.setdefault(c.id, c)
        self._tokens = 0
        self._token_prefix = f"{random.getrandbits(64):016x}"
        # Fail on a bad default zone at start-up rather than on the first send.
        resolve_timezone(Contact(user_id="-", phone="+10000000000"), default_timezone)

    # ------------------------------------------------------------------ entry points

    def on_decision(self, decision: Decision, now_ms: int) -> Step:
        token = self.token()
        prior = self.store.begin(decision, token, resume_deferred=False)
        return self.resolve(self.after_begin(decision, now_ms, token, prior))

    def after_begin(
        self,
        decision: Decision,
        now_ms: int,
        token: str,
        prior: Prior,
        prefetched: Prefetched | None = None,
    ) -> Pending:
        """Everything after ``begin`` up to the cap check; ``prefetched`` replaces the reads
        of steps 2-3 (otherwise they are read from the store when needed)."""
        if prior.state == "busy":
            return Step(retry_after_ms=max(1, prior.wait_ms))
        if prior.state == "calling":
            return self._pending_final(decision, token, now_ms, "failed", UNKNOWN_AFTER_CRASH)
        if prior.state in ("deferred", "done"):
            # Redelivery: publish the recorded outcome if it never made it out (with its dead
            # letter: a crash before the commit may have lost that record too).
            if prior.outcome is not None and not prior.emitted:
                step = Step([prior.outcome])
                if prior.dead_letter:
                    step.dead_letter = (decision, prior.outcome.reason or "failed")
                return step
            return Step()
        return self._pre_caps(decision, now_ms, token, prefetched)

    def resolve(self, pending: Pending) -> Step:
        """Finish ``pending`` with one store call at a time (cap check, then what follows)."""
        while not isinstance(pending, Step):
            if isinstance(pending, Final):
                return self.settle(pending, self._record(pending))
            violated = self.store.check_caps(
                pending.decision, pending.rules, pending.now_ms, pending.reserve
            )
            pending = self.after_caps(pending, violated)
        return pending

    def settle(self, final: Final, recorded: bool) -> Step:
        """The step for ``final`` once the store said whether it recorded it."""
        if not recorded:
            return Step()  # another attempt took the decision over and publishes its outcome
        step = Step([final.outcome])
        if final.dead_letter:
            step.dead_letter = (final.decision, final.outcome.reason or "failed")
        return step

    def settled(self, pending: Pending, violated: int | None, recorded: bool) -> Step:
        """The step for ``pending`` once a batching store has recorded it (a ``Final``:
        ``recorded``) or checked its caps in one call that also recorded the capped outcome (a
        ``CapCheck``: ``violated``, ``recorded``); what follows a passed check runs here."""
        if isinstance(pending, Final):
            return self.settle(pending, recorded)
        if isinstance(pending, CapCheck):
            if violated is not None:
                # ``settle(after_caps(pending, violated), recorded)`` without the Final
                return Step([pending.capped_by(violated)]) if recorded else Step()
            return self.resolve(self.after_caps(pending, None))
        return pending

    def after_caps(self, check: CapCheck, violated: int | None) -> Pending:
        """Steps 5-6 once the caps are checked (``violated``: index of the first broken rule)."""
        d, token, now_ms, campaign = check.decision, check.token, check.now_ms, check.campaign
        if violated is not None:
            return Final(d, token, check.capped_by(violated))
        if check.until is not None:
            if check.quiet.action == "drop":
                return self._pending_final(d, token, now_ms, "suppressed", "quiet_hours")
            if is_stale(d.fire_at, check.until, campaign.max_defer_ms):
                return self._pending_final(d, token, now_ms, "suppressed", "stale")
            outcome = self._outcome(d, now_ms, "deferred", "quiet_hours", due_at=check.until)
            return Step([outcome]) if self.store.defer(d, check.until, outcome, token) else Step()
        return self._render(check)

    def on_cancel(self, cancel: DecisionCancelled, now_ms: int) -> Step:
        outcome = SmsOutcome(
            decision_id=cancel.decision_id,
            campaign_id=cancel.campaign_id,
            user_id=cancel.user_id,
            status="cancelled",
            reason=cancel.reason,
            at=now_ms,
        )
        hit = self.store.cancel(cancel, outcome, event_clock=self.event_clock)
        return Step([outcome]) if hit else Step()

    def release_due(self, now_ms: int | None, limit: int = 256) -> list[Step]:
        """Evaluate deferred sends due at ``now_ms`` (all of them when None).

        With the event clock each is evaluated at its own due time; live, at ``now_ms``.
        """
        steps = []
        for decision, due in self.store.claim_due(now_ms, limit):
            step = self.release_one(decision, due, now_ms)
            if step is not None:
                steps.append(step)
        return steps

    def release_one(self, decision: Decision, due: int, now_ms: int | None) -> Step | None:
        """Evaluate one claimed deferred send (see :meth:`release_due`); None: nothing to do."""
        at = due if self.event_clock or now_ms is None else max(now_ms, due)
        token = self.token()
        prior = self.store.begin(decision, token, resume_deferred=True)
        if prior.state == "busy":
            return None  # our claim's lease runs out and the send comes due again
        if prior.state == "calling":
            return self._final(decision, token, at, "failed", UNKNOWN_AFTER_CRASH)
        if prior.state in ("new", "reserved", "deferred"):
            return self._evaluate(decision, at, token)
        return None  # "done": finished meanwhile; the store drops such claims.

    def begin_call(self, plan: SendPlan) -> Step | None:
        """Last check before the gateway (thread-safe): None means go ahead and call."""
        as_of = plan.now_ms if self.event_clock else None  # replays: only earlier conversions
        permit = self.store.start_call(plan.decision, plan.token, as_of)
        if permit == "ok":
            return None
        if permit == "lost":
            return Step()  # another attempt owns the decision and will publish its outcome
        self.store.release_caps(plan.decision)
        reason = permit.split(":", 1)[1] if ":" in permit else "cancelled"
        return self._final(plan.decision, plan.token, plan.now_ms, "cancelled", reason)

    def complete(self, plan: SendPlan, result: SendResult | GatewayError, at_ms: int) -> Step:
        """Turn the gateway's answer into the outcome (thread-safe)."""
        d, msg = plan.decision, plan.message
        if isinstance(result, SendResult):
            outcome = SmsOutcome(
                decision_id=d.decision_id,
                campaign_id=d.campaign_id,
                user_id=d.user_id,
                status="sent",
                at=at_ms,
                variant=d.variant,
                message_id=result.message_id,
                segments=msg.segments,
                encoding=msg.encoding,
                price=result.price,
            )
            if not self.store.finish(d, outcome, sent=True, token=plan.token):
                return Step()  # our lease ran out and another instance took over
            return Step([outcome])
        if isinstance(result, AmbiguousGatewayError):
            # The text may have gone out: never retried, not dead-lettered (not known to have
            # failed), its cap slot kept; like a crash during the call (unknown_after_crash).
            reason = f"unknown_after_{result.reason}"
            return self._final(d, plan.token, at_ms, "failed", reason, segments=msg.segments)
        if result.reason != "partial_failure":
            self.store.release_caps(d)  # nothing reached the handset
        final = self._pending_final(
            d, plan.token, at_ms, "failed", result.reason, segments=msg.segments
        )
        return self.resolve(replace(final, dead_letter=True))

    # ------------------------------------------------------------------ the ordered checks

    def _evaluate(self, d: Decision, now_ms: int, token: str) -> Step:
        return self.resolve(self._pre_caps(d, now_ms, token, None))

    def _pre_caps(
        self, d: Decision, now_ms: int, token: str, prefetched: Prefetched | None
    ) -> Pending:
        campaign = self._by_id.get(d.campaign_id)
        if campaign is None:
            return self._pending_final(d, token, now_ms, "failed", "unknown_campaign")
        if not campaign.enabled:
            return self._pending_final(d, token, now_ms, "suppressed", "campaign_disabled")
        # control group: decided and recorded, never sent (same hash as everywhere else)
        if experiment.in_holdout(campaign, d.user_id):
            return self._pending_final(d, token, now_ms, "suppressed", "holdout")
        # 2. consent
        # replays: consent as it stood at the decision's time (a STOP later in the replay waits)
        as_of = now_ms if self.event_clock else None
        if prefetched is not None:
            contact = prefetched.contact
        else:
            contact = self.store.contact(d.user_id, as_of)
        if contact is None:
            return self._pending_final(d, token, now_ms, "suppressed", "no_contact")
        if contact.consent == "opted_out":
            return self._pending_final(d, token, now_ms, "suppressed", "opted_out")
        if contact.consent != "opted_in":
            return self._pending_final(d, token, now_ms, "suppressed", "no_consent")
        # 3. exit conditions
        if prefetched is not None:
            cancelled = prefetched.cancellation
        else:
            cancelled = self.store.cancellation(d, as_of)
        if cancelled is not None:
            return self._pending_final(d, token, now_ms, "cancelled", cancelled)
        if is_stale(d.fire_at, now_ms, campaign.max_defer_ms):
            return self._pending_final(d, token, now_ms, "suppressed", "stale")
        # 4. caps (reserved only when the text can go now), 5. quiet hours
        zone = _zone(contact.timezone, contact.phone, self.default_timezone)
        quiet = campaign.quiet_hours or self.campaigns.quiet_hours
        until = self._quiet_until(quiet, now_ms, zone)
        rules, keys = self._rules[campaign.id]
        capped = self._outcome(d, now_ms, "suppressed", "frequency_cap")
        return CapCheck(
            d, token, now_ms, rules, until is None, capped, keys, campaign, contact, quiet, until
        )

    def _quiet_until(self, quiet: QuietHours, now_ms: int, zone: ZoneInfo) -> int | None:
        """``quiet_until``, memoized for the UTC minutes found wholly outside quiet hours: their
        bounds are whole local minutes, so such a minute stays outside them throughout when the
        zone's offset is the same whole number of minutes at both of its ends."""
        minute = now_ms // 60_000
        key = (quiet, zone, minute)
        if key in self._open_minutes:
            return None
        until = quiet_until(quiet, now_ms, zone)
        if until is None:
            first, last = minute * 60_000, minute * 60_000 + 59_999
            offset = _offset_s(first, zone)
            if (
                offset % 60 == 0
                and offset == _offset_s(last, zone)
                and quiet_until(quiet, first, zone) is None
                and quiet_until(quiet, last, zone) is None
            ):
                if len(self._open_minutes) > 4096:
                    self._open_minutes.clear()
                self._open_minutes.add(key)
        return until

    def _render(self, check: CapCheck) -> Pending:
        d, token, now_ms, campaign = check.decision, check.token, check.now_ms, check.campaign
        contact = check.contact
        # 6. rendering
        try:
            variant = d.variant if (campaign.id, d.variant) in self._templates else None
            rendered = render_message(
                self._templates[(campaign.id, variant)],
                template_variables(d, contact, campaign),
                experiment.message_for(campaign, variant).footer,
                add_footer=self.store.claim_first_text(d),
                max_segments=campaign.max_segments,
            )
        except TemplateError as exc:
            self.store.release_caps(d)
            return self._pending_final(d, token, now_ms, "failed", exc.reason)
        message = SmsMessage(
            decision_id=d.decision_id,
            campaign_id=d.campaign_id,
            user_id=d.user_id,
            to=contact.phone,
            text=rendered.text,
            sent_at_ms=now_ms,
            segments=rendered.segments,
            encoding=rendered.encoding,
        )
        return Step(send=SendPlan(decision=d, token=token, message=message, now_ms=now_ms))

    # ------------------------------------------------------------------ helpers

    def token(self) -> str:
        """A fresh attempt token (unique per dispatcher process and attempt)."""
        self._tokens += 1
        return f"{self._token_prefix}-{self._tokens}"

    @staticmethod
    def _outcome(
        d: Decision, at: int, status: str, reason: str | None, **extra: object
    ) -> SmsOutcome:
        return SmsOutcome(
            decision_id=d.decision_id,
            campaign_id=d.campaign_id,
            user_id=d.user_id,
            status=status,
            reason=reason,
            at=at,
            variant=d.variant,
            **extra,  # type: ignore[arg-type]
        )

    def _pending_final(
        self, d: Decision, token: str, at: int, status: str, reason: str, **extra: object
    ) -> Final:
        return Final(d, token, self._outcome(d, at, status, reason, **extra))

    def _final(
        self, d: Decision, token: str, at: int, status: str, reason: str, **extra: object
    ) -> Step:
        return self.resolve(self._pending_final(d, token, at, status, reason, **extra))

    def _record(self, final: Final) -> bool:
        if final.dead_letter:
            return self.store.finish(
                final.decision, final.outcome, sent=False, token=final.token, dead_letter=True
            )
        return self.store.finish(final.decision, final.outcome, sent=False, token=final.token)


def deliver(
    plan: SendPlan,
    send: Callable[[SmsMessage], SendResult],
    retry: RetryPolicy,
    *,
    acquire: Callable[[], object] | None = None,
    sleep: Callable[[float], object] = time.sleep,
    rng: random.Random | None = None,
) -> SendResult | GatewayError:
    """Call ``send(message)`` with rate limiting and retries; never raises.

    ``acquire()`` blocks until the shared rate limit allows one more request; ``sleep(s)`` waits
    between attempts. Retryable errors are retried up to ``retry.attempts`` calls in total;
    anything that is not a ``GatewayError`` becomes a permanent ``unexpected_error`` (we cannot
    know whether the text went out, so it is never retried).
    """
    last: GatewayError = RetryableGatewayError("not_attempted")
    for attempt in range(max(1, retry.attempts)):
        if acquire is not None:
            acquire()
        try:
            return send(plan.message)
        except RetryableGatewayError as exc:
            last = exc
        except PermanentGatewayError as exc:
            return exc
        except GatewayError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - translate, never crash the worker thread
            return PermanentGatewayError("unexpected_error", type(exc).__name__)
        if attempt + 1 < retry.attempts:
            sleep(retry.delay_s(attempt, rng))
    return last


def with_send_time(plan: SendPlan, sent_at_ms: int) -> SendPlan:
    """The plan with the message stamped at the actual send time (live clock)."""
    return replace(plan, message=replace(plan.message, sent_at_ms=sent_at_ms))


def _offset_s(at_ms: int, zone: ZoneInfo) -> float:
    offset = datetime.fromtimestamp(at_ms / 1000, zone).utcoffset()
    return 0.0 if offset is None else offset.total_seconds()


@functools.lru_cache(maxsize=65_536)
def _zone(timezone: str | None, phone: str, default_tz: str) -> ZoneInfo:
    """``resolve_timezone`` memoized: it depends on these three values only, and the phone
    number lookup costs far more than the rest of a decision's policy."""
    return resolve_timezone(Contact(user_id="-", phone=phone, timezone=timezone), default_tz)


def contacts_by_id(contacts: Mapping[str, Contact] | Sequence[Contact]) -> dict[str, Contact]:
    if isinstance(contacts, Mapping):
        return dict(contacts)
    return {c.user_id: c for c in contacts}
