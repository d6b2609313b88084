"""The send policy in memory and in virtual time: an in-memory ``PolicyStore`` and a run.

``nudgeflow backtest --contacts`` and the tests use :func:`simulate` to see what the dispatcher
would have sent, with the same policy and the same clock rules as a replayed demo: every
decision is evaluated at its ``fire_at``, deferred sends at their due time, cancellations at
their ``at``.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from processors.core.campaign import CampaignSet
from processors.core.cap import CapRule, SendRecord, check_caps
from processors.core.contact import Contact
from processors.core.decision import Decision, DecisionCancelled
from processors.core.outcome import SmsOutcome
from processors.core.policy.requests import CallPermit, Prior
from processors.core.policy.runner import Policy
from processors.core.sms import SendResult, SmsMessage


@dataclass
class _Entry:
    state: str = ""
    token: str = ""
    outcome: SmsOutcome | None = None
    emitted: str | None = None
    cancel: str | None = None
    cancel_at: int = 0
    dead_letter: bool = False


@dataclass
class InMemoryStore:
    """``PolicyStore`` in dicts (single-threaded; the backtest and unit tests)."""

    contacts: dict[str, Contact] = field(default_factory=dict)
    entries: dict[str, _Entry] = field(default_factory=dict)
    sends: dict[str, dict[str, SendRecord]] = field(default_factory=dict)  # user -> did -> send
    first_texts: dict[str, str] = field(default_factory=dict)  # user -> decision id
    deferred: dict[str, tuple[int, Decision]] = field(default_factory=dict)  # did -> (due, d)
    claimed: set[str] = field(default_factory=set)
    _due: list[tuple[int, str]] = field(default_factory=list)  # heap; stale entries skipped

    def _entry(self, decision_id: str) -> _Entry:
        return self.entries.setdefault(decision_id, _Entry())

    def contact(self, user_id: str, as_of: int | None = None) -> Contact | None:
        return self.contacts.get(user_id)

    def begin(self, decision: Decision, token: str, resume_deferred: bool) -> Prior:
        e = self._entry(decision.decision_id)
        if not e.state or e.state == "reserved" or (e.state == "deferred" and resume_deferred):
            prior = e.state or "new"
            e.state, e.token = "reserved", token
            return Prior(prior)  # type: ignore[arg-type]
        emitted = e.outcome is not None and e.emitted == e.outcome.status
        if e.state == "calling" or not emitted:
            e.token = token  # the previous attempt is gone: this one owns the decision
        return Prior(e.state, e.outcome, emitted, dead_letter=e.dead_letter)  # type: ignore[arg-type]

    def cancellation(self, decision: Decision, as_of: int | None = None) -> str | None:
        e = self._entry(decision.decision_id)
        if e.cancel is None or (as_of is not None and e.cancel_at > as_of):
            return None
        return e.cancel

    def cancel(
        self, cancel: DecisionCancelled, outcome: SmsOutcome, event_clock: bool = False
    ) -> bool:
        e = self._entry(cancel.decision_id)
        e.cancel_at = cancel.at
        if event_clock:  # see RedisStore.cancel: a send deferred to before the cancel stays
            entry = self.deferred.get(cancel.decision_id)
            if entry is not None and entry[0] < cancel.at:
                e.cancel = cancel.reason
                return False
        e.cancel = cancel.reason
        if e.state == "deferred" and cancel.decision_id in self.deferred:
            del self.deferred[cancel.decision_id]
            e.state, e.outcome, e.emitted = "done", outcome, None
            return True
        return False

    def check_caps(
        self, decision: Decision, rules: Sequence[CapRule], now_ms: int, reserve: bool
    ) -> int | None:
        mine = self.sends.setdefault(decision.user_id, {})
        if decision.decision_id in mine:
            return None
        violated = check_caps(rules, list(mine.values()), now_ms)
        if violated is not None:
            return list(rules).index(violated)
        if reserve:
            mine[decision.decision_id] = SendRecord(decision.campaign_id, now_ms)
        return None

    def release_caps(self, decision: Decision) -> None:
        self.sends.get(decision.user_id, {}).pop(decision.decision_id, None)
        if self.first_texts.get(decision.user_id) == decision.decision_id:
            del self.first_texts[decision.user_id]

    def claim_first_text(self, decision: Decision) -> bool:
        holder = self.first_texts.setdefault(decision.user_id, decision.decision_id)
        return holder == decision.decision_id

    def defer(self, decision: Decision, due_ms: int, outcome: SmsOutcome, token: str) -> bool:
        e = self._entry(decision.decision_id)
        if e.token != token:
            return False
        e.state, e.outcome, e.emitted = "deferred", outcome, None
        self.deferred[decision.decision_id] = (due_ms, decision)
        heapq.heappush(self._due, (due_ms, decision.decision_id))
        self.claimed.discard(decision.decision_id)
        return True

    def claim_due(self, now_ms: int | None, limit: int) -> list[tuple[Decision, int]]:
        out: list[tuple[Decision, int]] = []
        while self._due and len(out) < limit and (now_ms is None or self._due[0][0] <= now_ms):
            due, did = heapq.heappop(self._due)
            entry = self.deferred.get(did)
            if entry is None or entry[0] != due:
                continue  # cancelled or re-deferred since
            del self.deferred[did]
            self.claimed.add(did)
            out.append((entry[1], due))
        return out

    def start_call(self, decision: Decision, token: str, as_of: int | None = None) -> CallPermit:
        e = self._entry(decision.decision_id)
        if e.token != token or e.state != "reserved":
            return "lost"
        if self.cancellation(decision, as_of) is not None:
            return f"cancelled:{e.cancel}"
        e.state = "calling"
        return "ok"

    def finish(
        self,
        decision: Decision,
        outcome: SmsOutcome,
        sent: bool,
        token: str,
        dead_letter: bool = False,
    ) -> bool:
        e = self._entry(decision.decision_id)
        if e.token != token:
            return False
        e.state, e.outcome, e.emitted, e.dead_letter = "done", outcome, None, dead_letter
        self.claimed.discard(decision.decision_id)
        return True

    def mark_emitted(self, decision: Decision, status: str) -> None:
        self._entry(decision.decision_id).emitted = status


def contacts_by_id(contacts: Mapping[str, Contact] | Sequence[Contact]) -> dict[str, Contact]:
    if isinstance(contacts, Mapping):
        return dict(contacts)
    return {c.user_id: c for c in contacts}


@dataclass
class Simulation:
    """Result of :func:`simulate`: every outcome in order, and the texts that would go out."""

    outcomes: list[SmsOutcome] = field(default_factory=list)
    messages: list[SmsMessage] = field(default_factory=list)

    def final(self) -> dict[str, SmsOutcome]:
        """The last outcome of each decision."""
        return {o.decision_id: o for o in self.outcomes}


def simulate(
    decisions: Iterable[Decision],
    cancellations: Iterable[DecisionCancelled],
    campaigns: CampaignSet,
    contacts: Mapping[str, Contact] | Sequence[Contact],
    *,
    default_timezone: str = "UTC",
    cooldown_ms: int = 4 * 3_600_000,
) -> Simulation:
    """Apply the send policy in virtual time; the gateway accepts every text.

    Items run in time order (decisions at ``fire_at``, cancellations at ``at``; a decision goes
    before a cancellation with the same time), and deferred sends are released at their due time
    between them, then all remaining ones at the end.
    """
    store = InMemoryStore(contacts=contacts_by_id(contacts))
    policy = Policy(
        campaigns,
        store,
        default_timezone=default_timezone,
        cooldown_ms=cooldown_ms,
        event_clock=True,
    )
    items: list[tuple[int, int, int, Decision | DecisionCancelled]] = []
    for i, d in enumerate(decisions):
        items.append((d.fire_at, 0, i, d))
    for i, c in enumerate(cancellations):
        items.append((c.at, 1, i, c))
    heapq.heapify(items)
    sim = Simulation()

    def run(steps: Iterable[object]) -> None:
        for step in steps:
            sim.outcomes.extend(step.outcomes)  # type: ignore[attr-defined]
            plan = step.send  # type: ignore[attr-defined]
            if plan is None:
                continue
            gate = policy.begin_call(plan)
            if gate is not None:
                sim.outcomes.extend(gate.outcomes)
                continue
            sim.messages.append(plan.message)
            result = SendResult(f"sim-{len(sim.messages)}", None, None, None)
            sim.outcomes.extend(policy.complete(plan, result, plan.now_ms).outcomes)

    while items:
        at, _kind, _i, item = heapq.heappop(items)
        # Release everything due by this item's time, each at its own due time.
        run(policy.release_due(at, limit=1_000_000))
        if isinstance(item, Decision):
            run([policy.on_decision(item, at)])
        else:
            run([policy.on_cancel(item, at)])
    run(policy.release_due(None, limit=1_000_000))
    return sim


def simulate_dispatch(
    decisions: Iterable[Decision],
    cancellations: Iterable[DecisionCancelled],
    campaigns: CampaignSet,
    contacts: Mapping[str, Contact] | Sequence[Contact],
    *,
    default_timezone: str = "UTC",
    cooldown_ms: int = 4 * 3_600_000,
) -> list[SmsOutcome]:
    """Every outcome the dispatcher would publish, in order (see :func:`simulate`)."""
    return simulate(
        decisions,
        cancellations,
        campaigns,
        contacts,
        default_timezone=default_timezone,
        cooldown_ms=cooldown_ms,
    ).outcomes


def summarize(sim: Simulation) -> str:
    """Sends and suppressions by reason, per campaign (final outcome of each decision)."""
    final = sim.final()
    by = Counter((o.campaign_id, o.status, o.reason or "") for o in final.values())
    lines = [f"{'campaign':<22}{'status':<12}{'reason':<22}{'count':>7}"]
    for (campaign, status, reason), n in sorted(by.items()):
        lines.append(f"{campaign:<22}{status:<12}{reason:<22}{n:>7}")
    totals = Counter(o.status for o in final.values())
    lines.append(
        "texts="
        + str(len(sim.messages))
        + " "
        + " ".join(f"{k}={v}" for k, v in sorted(totals.items()))
    )
    return "\n".join(lines)
