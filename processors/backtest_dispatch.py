"""The send policy applied to a backtest's decisions, in memory and in virtual time.

Same ``processors.core.policy.Policy`` as the live dispatcher (consent, exit conditions, caps,
quiet hours, rendering), over an in-memory store: what would have been sent, and why not.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from processors.commands.contacts import read_contacts
from processors.core.campaign import CampaignSet
from processors.core.decision import Decision, DecisionCancelled
from processors.files import LineErrors
from processors.policy_store import Simulation, simulate
from processors.settings import Settings


def dispatch_simulation(
    decisions: list[Decision],
    cancellations: list[DecisionCancelled],
    campaigns: CampaignSet,
    contacts_path: Path,
    settings: Settings,
) -> tuple[Simulation, LineErrors]:
    errors = LineErrors(str(contacts_path))
    contacts = read_contacts(contacts_path, errors)
    sim = simulate(
        decisions,
        cancellations,
        campaigns,
        contacts,
        default_timezone=settings.default_timezone,
        cooldown_ms=int(settings.cooldown_s * 1000),
    )
    return sim, errors


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


def dispatch_report(
    decisions: list[Decision],
    cancellations: list[DecisionCancelled],
    campaigns: CampaignSet,
    contacts_path: Path,
    settings: Settings,
) -> str:
    sim, errors = dispatch_simulation(decisions, cancellations, campaigns, contacts_path, settings)
    return summarize(sim) + (f"\ncontacts skipped: {len(errors)}" if len(errors) else "")
