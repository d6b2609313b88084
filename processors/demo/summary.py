"""The demo's closing table: per campaign, what was decided, sent, clicked and converted."""

from __future__ import annotations

from typing import Any


def summary_table(figures: dict[str, Any]) -> str:
    """Per campaign: decided, sent, suppressed by reason, clicked, converted, lift over holdout."""
    head = (
        f"{'campaign':<20}{'decided':>8}{'sent':>6}{'clicked':>8}{'converted':>10}"
        f"{'conv%':>7}  {'lift over holdout [95% CI]':<42}not sent (reason: n)"
    )
    lines = [head, "-" * len(head)]
    for c in figures["campaigns"]:
        conv = c["conversion_rate"]
        lift = c["lift"]
        if lift is not None:
            mark = " significant" if lift["low"] > 0 or lift["high"] < 0 else ""
            lift_text = (
                f"{100 * lift['diff']:+.1f} pp [{100 * lift['low']:+.1f}, "
                f"{100 * lift['high']:+.1f}]{mark}"
            )
        else:
            lift_text = c.get("lift_why") or "-"
        not_sent = ", ".join(
            f"{k.split(':', 1)[1] or k.rstrip(':')}: {n}"
            for k, n in sorted(c["not_sent"].items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"{c['campaign_id']:<20}{c['decisions']:>8}{c['sent']:>6}"
            f"{_fig(c['clicked']):>8}{_fig(c['converted']):>10}"
            f"{'' if conv is None else f'{100 * conv:.1f}':>7}  {lift_text:<42}{not_sent or '-'}"
        )
    return "\n".join(lines)


def _fig(x: object) -> str:
    return "?" if x is None else str(x)
