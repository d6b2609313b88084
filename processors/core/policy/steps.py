"""The ordered checks as pure code: from what the store answered to the next request.

:class:`PolicySteps` never touches a store. ``start`` takes what ``begin`` answered for a
decision, ``answer`` the gateway's answer for a send; each returns a :class:`Step` (done) or a
request for one store operation (:mod:`processors.core.policy.requests`), and ``advance`` turns
that operation's answer into the next one. :class:`~processors.core.policy.runner.Policy` runs
the requests one at a time; the live dispatcher runs the ``Final`` and ``CapCheck`` requests of
a whole batch in one round trip.
"""

from __future__ import annotations

import functools
import random
from datetime import datetime
from zoneinfo import ZoneInfo

import jinja2

from processors.core import experiment
from processors.core.campaign import Campaign, CampaignSet
from processors.core.cap import GLOBAL_SCOPE, CapRule, rule_key
from processors.core.contact import Contact, resolve_timezone
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy.requests import (
    UNKNOWN_AFTER_CRASH,
    CallGate,
    CallPermit,
    Cancel,
    CapCheck,
    Defer,
    Final,
    FirstText,
    Pending,
    Prefetched,
    Prior,
    Read,
    Request,
    SendPlan,
    Step,
)
from processors.core.quiet_hours import QuietHours, is_stale, quiet_until
from processors.core.rendering import TemplateError, compile_template, render_message
from processors.core.sms import AmbiguousGatewayError, GatewayError, SendResult, SmsMessage


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


class PolicySteps:
    """The ordered checks of one dispatcher (or backtest); pure, not thread-safe (``token``)."""

    def __init__(
        self,
        campaigns: CampaignSet,
        *,
        default_timezone: str = "UTC",
        cooldown_ms: int = 4 * 3_600_000,
        event_clock: bool = False,
    ) -> None:
        self.campaigns = campaigns
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

    def token(self) -> str:
        """A fresh attempt token (unique per dispatcher process and attempt)."""
        self._tokens += 1
        return f"{self._token_prefix}-{self._tokens}"

    # ------------------------------------------------------------------ the three verbs

    def start(
        self,
        decision: Decision,
        now_ms: int,
        token: str,
        prior: Prior,
        reads: Prefetched | None = None,
        *,
        released: bool = False,
    ) -> Pending:
        """What follows ``begin`` (``prior``) for ``decision`` at ``now_ms``; ``released``: a
        deferred send now due (``begin`` resumed it). ``reads``: the reads of steps 2-3 when
        the caller has them already (batches), else a :class:`Read` asks for them."""
        if prior.state == "busy":
            return Step() if released else Step(retry_after_ms=max(1, prior.wait_ms))
        if prior.state == "calling":
            return self._final(decision, token, now_ms, "failed", UNKNOWN_AFTER_CRASH)
        if prior.state == "done" or (prior.state == "deferred" and not released):
            if released:
                return Step()
            # Redelivery: publish the recorded outcome if it never made it out (with its dead
            # letter: a crash before the commit may have lost that record too).
            if prior.outcome is not None and not prior.emitted:
                step = Step([prior.outcome])
                if prior.dead_letter:
                    step.dead_letter = (decision, prior.outcome.reason or "failed")
                return step
            return Step()
        return self._checks(decision, now_ms, token, reads)

    def answer(self, plan: SendPlan, result: SendResult | GatewayError, at_ms: int) -> Final:
        """The gateway's answer for ``plan`` as the outcome to record."""
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
            return Final(d, plan.token, outcome, sent=True)
        if isinstance(result, AmbiguousGatewayError):
            # The text may have gone out: never retried, not dead-lettered (not known to have
            # failed), its cap slot kept; like a crash during the call (unknown_after_crash).
            reason = f"unknown_after_{result.reason}"
            return self._final(d, plan.token, at_ms, "failed", reason, segments=msg.segments)
        outcome = self._outcome(d, at_ms, "failed", result.reason, segments=msg.segments)
        # a partial failure reached the handset in part: its cap slot is kept
        release = result.reason != "partial_failure"
        return Final(d, plan.token, outcome, dead_letter=True, release=release)

    def advance(self, request: Request, answer: object) -> Pending | SendPlan:
        """The next step once the store answered ``request`` (see each request's doc); a
        :class:`CallGate` answered ``ok`` advances to its plan (call the gateway)."""
        if isinstance(request, Final):
            return self.recorded(request, bool(answer))
        if isinstance(request, CapCheck):
            return self._after_caps(request, answer)  # type: ignore[arg-type]
        if isinstance(request, Read):
            assert isinstance(answer, Prefetched)
            return self._checks(request.decision, request.now_ms, request.token, answer)
        if isinstance(request, Defer):
            return Step([request.outcome]) if answer else Step()
        if isinstance(request, FirstText):
            return self._render(request.check, bool(answer))
        if isinstance(request, Cancel):
            return Step([request.outcome]) if answer else Step()
        return self._after_gate(request, answer)  # type: ignore[arg-type]

    def cancel(self, cancel: DecisionCancelled, now_ms: int) -> Cancel:
        """A ``DecisionCancelled`` seen at ``now_ms``: remember it (step 3 and the last check
        before the call see it) and drop the send if it is deferred."""
        outcome = SmsOutcome(
            decision_id=cancel.decision_id,
            campaign_id=cancel.campaign_id,
            user_id=cancel.user_id,
            status="cancelled",
            reason=cancel.reason,
            at=now_ms,
        )
        return Cancel(cancel, outcome)

    # ------------------------------------------------------------------ the ordered checks

    def _checks(
        self, d: Decision, now_ms: int, token: str, reads: Prefetched | None
    ) -> Final | Read | CapCheck:
        campaign = self._by_id.get(d.campaign_id)
        if campaign is None:
            return self._final(d, token, now_ms, "failed", "unknown_campaign")
        if not campaign.enabled:
            return self._final(d, token, now_ms, "suppressed", "campaign_disabled")
        # control group: decided and recorded, never sent (same hash as everywhere else)
        if experiment.in_holdout(campaign, d.user_id):
            return self._final(d, token, now_ms, "suppressed", "holdout")
        if reads is None:
            return Read(d, token, now_ms)
        # 2. consent (replays: as it stood at the decision's time)
        contact = reads.contact
        if contact is None:
            return self._final(d, token, now_ms, "suppressed", "no_contact")
        if contact.consent == "opted_out":
            return self._final(d, token, now_ms, "suppressed", "opted_out")
        if contact.consent != "opted_in":
            return self._final(d, token, now_ms, "suppressed", "no_consent")
        # 3. exit conditions
        if reads.cancellation is not None:
            return self._final(d, token, now_ms, "cancelled", reads.cancellation)
        if is_stale(d.fire_at, now_ms, campaign.max_defer_ms):
            return self._final(d, token, now_ms, "suppressed", "stale")
        # 4. caps (reserved only when the text can go now), 5. quiet hours
        zone = _zone(contact.timezone, contact.phone, self.default_timezone)
        quiet = campaign.quiet_hours or self.campaigns.quiet_hours
        until = self._quiet_until(quiet, now_ms, zone)
        rules, keys = self._rules[campaign.id]
        capped = self._outcome(d, now_ms, "suppressed", "frequency_cap")
        return CapCheck(
            d, token, now_ms, rules, until is None, capped, keys, campaign, contact, quiet, until
        )

    def _after_caps(self, check: CapCheck, violated: int | None) -> Final | Defer | FirstText:
        """Steps 5-6 once the caps are checked (``violated``: index of the first broken rule)."""
        d, token, now_ms, campaign = check.decision, check.token, check.now_ms, check.campaign
        if violated is not None:
            return Final(d, token, check.capped_by(violated))
        if check.until is not None:
            if check.quiet.action == "drop":
                return self._final(d, token, now_ms, "suppressed", "quiet_hours")
            if is_stale(d.fire_at, check.until, campaign.max_defer_ms):
                return self._final(d, token, now_ms, "suppressed", "stale")
            outcome = self._outcome(d, now_ms, "deferred", "quiet_hours", due_at=check.until)
            return Defer(d, token, check.until, outcome)
        return FirstText(check)

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

    def _render(self, check: CapCheck, add_footer: bool) -> Step | Final:
        """6. rendering (``add_footer``: this is the first text to the contact)."""
        d, token, now_ms, campaign = check.decision, check.token, check.now_ms, check.campaign
        contact = check.contact
        try:
            variant = d.variant if (campaign.id, d.variant) in self._templates else None
            rendered = render_message(
                self._templates[(campaign.id, variant)],
                template_variables(d, contact, campaign),
                experiment.message_for(campaign, variant).footer,
                add_footer=add_footer,
                max_segments=campaign.max_segments,
            )
        except TemplateError as exc:
            outcome = self._outcome(d, now_ms, "failed", exc.reason)
            return Final(d, token, outcome, release=True)
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

    def _after_gate(self, gate: CallGate, permit: CallPermit) -> Step | Final | SendPlan:
        plan = gate.plan
        if permit == "ok":
            return plan
        if permit == "lost":
            return Step()  # another attempt owns the decision and will publish its outcome
        reason = permit.split(":", 1)[1] if ":" in permit else "cancelled"
        outcome = self._outcome(plan.decision, plan.now_ms, "cancelled", reason)
        return Final(plan.decision, plan.token, outcome, release=True)

    @staticmethod
    def recorded(final: Final, recorded: bool) -> Step:
        """The step for ``final`` once the store said whether it recorded it."""
        if not recorded:
            return Step()  # another attempt took the decision over and publishes its outcome
        step = Step([final.outcome])
        if final.dead_letter:
            step.dead_letter = (final.decision, final.outcome.reason or "failed")
        return step

    # ------------------------------------------------------------------ helpers

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

    def _final(
        self, d: Decision, token: str, at: int, status: str, reason: str, **extra: object
    ) -> Final:
        return Final(d, token, self._outcome(d, at, status, reason, **extra))


def _offset_s(at_ms: int, zone: ZoneInfo) -> float:
    offset = datetime.fromtimestamp(at_ms / 1000, zone).utcoffset()
    return 0.0 if offset is None else offset.total_seconds()


@functools.lru_cache(maxsize=65_536)
def _zone(timezone: str | None, phone: str, default_tz: str) -> ZoneInfo:
    """``resolve_timezone`` memoized: it depends on these three values only, and the phone
    number lookup costs far more than the rest of a decision's policy."""
    return resolve_timezone(Contact(user_id="-", phone=phone, timezone=timezone), default_tz)
