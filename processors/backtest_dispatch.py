"""``nudgeflow backtest --contacts``: the send policy over a contacts file, in memory.

The run itself is :func:`processors.core.policy.memory.simulate`, the same policy as the live
dispatcher in virtual time; this module reads the contacts file and prints the summary.
"""

from __future__ import annotations

from pathlib import Path

from processors.commands.contacts import read_contacts
from processors.core.campaign import CampaignSet
from processors.core.decision import Decision, DecisionCancelled
from processors.core.policy.memory import Simulation, simulate, summarize
from processors.files import LineErrors
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


def dispatch_report(
    decisions: list[Decision],
    cancellations: list[DecisionCancelled],
    campaigns: CampaignSet,
    contacts_path: Path,
    settings: Settings,
) -> str:
    sim, errors = dispatch_simulation(decisions, cancellations, campaigns, contacts_path, settings)
    return summarize(sim) + (f"\ncontacts skipped: {len(errors)}" if len(errors) else "")
