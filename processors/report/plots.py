"""The report's plots: PNGs (matplotlib, Agg canvas) as base64 for ``data:`` URIs."""

from __future__ import annotations

import base64
import io
from typing import Any

# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(row: dict[str, Any]) -> str:
    v = row["variant"]
    return row["campaign_id"] if v in (None, "*") else f"{row['campaign_id']} / {v}"


def _cmap(n: int) -> list[Any]:
    """``n`` colours from fast (green) to slow (red)."""
    from matplotlib import colormaps

    ramp = colormaps["RdYlGn_r"]
    return [ramp(i / max(1, n - 1)) for i in range(n)]


def plots(fig_data: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs: funnel, conversion vs holdout with lift intervals, sends by hour, trends."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = fig_data["rows"]
    out: dict[str, str] = {}
    if not rows:
        return out
    labels = [_label(r) for r in rows]
    height = max(2.5, 0.45 * len(rows) + 1)

    fig = Figure(figsize=(9, height))
    ax = fig.add_subplot()
    stages = [("sent", "#4c72b0"), ("delivered", "#55a868"), ("clicked", "#dd8452"),
              ("converted", "#c44e52")]  # fmt: skip
    bar = 0.8 / len(stages)
    for i, (name, colour) in enumerate(stages):
        values = [r[name] or 0 for r in rows]
        ax.barh([y + i * bar for y in range(len(rows))], values, bar, label=name, color=colour)
    ax.set_yticks([y + 0.4 - bar / 2 for y in range(len(rows))], labels)
    ax.invert_yaxis()
    ax.set_xlabel("decisions")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Funnel per campaign and variant")
    out["funnel"] = _png(fig)

    lifted = [r for r in rows if r["lift"] is not None]
    if lifted:
        fig = Figure(figsize=(9, max(2.5, 0.45 * len(lifted) + 1)))
        ax = fig.add_subplot()
        ys = list(range(len(lifted)))
        diffs = [100 * r["lift"]["diff"] for r in lifted]
        lows = [100 * (r["lift"]["diff"] - r["lift"]["low"]) for r in lifted]
        highs = [100 * (r["lift"]["high"] - r["lift"]["diff"]) for r in lifted]
        ax.errorbar(diffs, ys, xerr=[lows, highs], fmt="o", capsize=4, color="#4c72b0")
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(ys, [_label(r) for r in lifted])
        ax.invert_yaxis()
        ax.set_xlabel("lift over holdout, percentage points (95% Newcombe interval)")
        ax.set_title("Lift over holdout")
        out["lift"] = _png(fig)

    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    bottom = [0] * 24
    for c in fig_data["campaigns"]:
        hours = c["sends_by_hour"]
        if any(hours):
            ax.bar(range(24), hours, bottom=bottom, label=c["campaign_id"])
            bottom = [b + h for b, h in zip(bottom, hours, strict=True)]
    ax.set_xticks(range(0, 24, 2))
    ax.set_xlabel("hour of day (UTC)")
    ax.set_ylabel("texts sent")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Sends by hour of day")
    if any(bottom):
        ax.legend(fontsize=7, ncol=2)
    out["hours"] = _png(fig)

    sent = [c for c in fig_data["campaigns"] if c["sent"]]
    if sent:
        fig = Figure(figsize=(9, max(2.5, 0.45 * len(sent) + 1.2)))
        ax = fig.add_subplot()
        names = fig_data["lag_bins"]
        left = [0.0] * len(sent)
        cmap = _cmap(len(names))
        for i, name in enumerate(names):
            shares = [100 * c["trigger_to_send_bins"][i] / c["sent"] for c in sent]
            ax.barh(range(len(sent)), shares, left=left, label=name, color=cmap[i])
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_yticks(range(len(sent)), [c["campaign_id"] for c in sent])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of the campaign's texts, %")
        ax.set_title("Time from the action to the text")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        out["lags"] = _png(fig)

    local = [c for c in fig_data["campaigns"] if c.get("sends_by_local_hour")]
    if local and any(any(c["sends_by_local_hour"]) for c in local):
        fig = Figure(figsize=(9, 3.2))
        ax = fig.add_subplot()
        quiet = fig_data.get("quiet_hours")
        if quiet:
            start, end = quiet
            spans = [(start, end)] if start < end else [(start, 24), (0, end)]
            for i, (a, b) in enumerate(spans):
                ax.axvspan(a - 0.5, b - 0.5, color="#999999", alpha=0.15,
                           label="quiet hours" if i == 0 else None)  # fmt: skip
        bottom = [0] * 24
        for c in local:
            hours = c["sends_by_local_hour"]
            if any(hours):
                ax.bar(range(24), hours, bottom=bottom, label=c["campaign_id"])
                bottom = [b + h for b, h in zip(bottom, hours, strict=True)]
        ax.set_xticks(range(0, 24, 2))
        ax.set_xlim(-0.5, 23.5)
        ax.set_xlabel("hour of day in the recipient's time zone")
        ax.set_ylabel("texts sent")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Sends by the recipient's local hour")
        ax.legend(fontsize=7, ncol=2)
        out["local_hours"] = _png(fig)

    trends = [t for t in fig_data["trends"] if t["weeks"]]
    if trends:
        fig = Figure(figsize=(9, 3.2))
        ax = fig.add_subplot()
        for t in trends:
            weeks = [w for w in t["weeks"] if w["rate"] is not None]
            ax.plot(
                [w["week"] for w in weeks],
                [100 * w["rate"] for w in weeks],
                marker="o",
                label=t["campaign_id"] + (" (falling)" if t["falling"] else ""),
            )
        ax.set_ylabel("conversion rate, %")
        ax.set_xlabel("week of send (Monday, UTC)")
        ax.set_title("Weekly conversion rate")
        ax.legend(fontsize=7)
        out["trends"] = _png(fig)
    return out
