"""``Policy``: the ordered checks (:class:`PolicySteps`, pure) run against a store.

Every store call the policy makes is in :meth:`Policy.perform`, one request at a time. The
entry points are the moments a shell meets: a decision, a cancellation, deferred sends coming
due, the last check before the gateway call and the gateway's answer; plus :meth:`settled`, the
continuation of a request a batching store answered for many decisions at once.
"""

from __future__ import annotations

from processors.core.campaign import CampaignSet
from processors.core.decision import Decision, DecisionCancelled
from processors.core.policy.requests import (
    CallGate,
    Cancel,
    CapCheck,
    Defer,
    Final,
    FirstText,
    Pending,
    Prefetched,
    Read,
    Request,
    SendPlan,
    Step,
)
from processors.core.policy.steps import PolicySteps
from processors.core.policy.store import PolicyStore
from processors.core.sms import GatewayError, SendResult


class Policy:
    """The ordered policy over ``store``; one instance per dispatcher (or backtest), not
    thread-safe except for :meth:`begin_call` and :meth:`complete`, which only touch the
    (thread-safe) store."""

    def __init__(
        self,
        campaigns: CampaignSet,
        store: PolicyStore,
        *,
        default_timezone: str = "UTC",
        cooldown_ms: int = 4 * 3_600_000,
        event_clock: bool = False,
    ) -> None:
        self.store = store
        self.event_clock = event_clock
        self.steps = PolicySteps(
            campaigns,
            default_timezone=default_timezone,
            cooldown_ms=cooldown_ms,
            event_clock=event_clock,
        )
        self.campaigns = campaigns
        self.global_rules = self.steps.global_rules
        self.token = self.steps.token

    # ------------------------------------------------------------------ entry points

    def on_decision(self, decision: Decision, now_ms: int) -> Step:
        token = self.token()
        prior = self.store.begin(decision, token, resume_deferred=False)
        return self.run(self.steps.start(decision, now_ms, token, prior))

    def on_cancel(self, cancel: DecisionCancelled, now_ms: int) -> Step:
        return self.run(self.steps.cancel(cancel, now_ms))

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
        """Evaluate one claimed deferred send (see :meth:`release_due`); None: nothing to do
        (another attempt holds it: the claim's lease runs out and it comes due again; or it
        finished meanwhile: the store drops such claims)."""
        at = due if self.event_clock or now_ms is None else max(now_ms, due)
        token = self.token()
        prior = self.store.begin(decision, token, resume_deferred=True)
        if prior.state in ("busy", "done"):
            return None
        return self.run(self.steps.start(decision, at, token, prior, released=True))

    def begin_call(self, plan: SendPlan) -> Step | None:
        """Last check before the gateway (thread-safe): None means go ahead and call."""
        out = self._drive(CallGate(plan))
        return None if isinstance(out, SendPlan) else out

    def complete(self, plan: SendPlan, result: SendResult | GatewayError, at_ms: int) -> Step:
        """Turn the gateway's answer into the outcome (thread-safe)."""
        return self.run(self.steps.answer(plan, result, at_ms))

    def settled(self, pending: Pending, violated: int | None, recorded: bool) -> Step:
        """The step for ``pending`` once a batching store has recorded it (a ``Final``:
        ``recorded``) or checked its caps in one call that also recorded the capped outcome (a
        ``CapCheck``: ``violated``, ``recorded``); what follows a passed check runs here."""
        if isinstance(pending, Final):
            return self.steps.recorded(pending, recorded)
        if isinstance(pending, CapCheck):
            if violated is not None:
                # advance(advance(pending, violated), recorded), without the Final in between
                return Step([pending.capped_by(violated)]) if recorded else Step()
            return self.run(self.steps.advance(pending, None))  # type: ignore[arg-type]
        return self.run(pending)

    # ------------------------------------------------------------------ running requests

    def run(self, pending: Pending) -> Step:
        """Answer requests one store call at a time until the step is done."""
        out = self._drive(pending)
        assert isinstance(out, Step), "only a CallGate advances to a plan"
        return out

    def _drive(self, pending: Pending | SendPlan) -> Step | SendPlan:
        while not isinstance(pending, (Step, SendPlan)):
            pending = self.steps.advance(pending, self.perform(pending))
        return pending

    def perform(self, request: Request) -> object:
        """The one store operation ``request`` names, and its answer."""
        store = self.store
        if isinstance(request, Final):
            d = request.decision
            if request.release:
                store.release_caps(d)
            if request.dead_letter:
                return store.finish(
                    d, request.outcome, sent=request.sent, token=request.token, dead_letter=True
                )
            return store.finish(d, request.outcome, sent=request.sent, token=request.token)
        if isinstance(request, CapCheck):
            d = request.decision
            return store.check_caps(d, request.rules, request.now_ms, request.reserve)
        if isinstance(request, Read):
            # replays: consent and exits as they stood at the decision's time
            as_of = request.now_ms if self.event_clock else None
            d = request.decision
            return Prefetched(store.contact(d.user_id, as_of), store.cancellation(d, as_of))
        if isinstance(request, Defer):
            d = request.decision
            return store.defer(d, request.due_ms, request.outcome, request.token)
        if isinstance(request, FirstText):
            return store.claim_first_text(request.check.decision)
        if isinstance(request, Cancel):
            return store.cancel(request.cancel, request.outcome, event_clock=self.event_clock)
        plan = request.plan
        as_of = plan.now_ms if self.event_clock else None  # replays: only earlier conversions
        return store.start_call(plan.decision, plan.token, as_of)
