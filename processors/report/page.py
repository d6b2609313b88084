"""The report's HTML page, and the JSON block of figures it embeds for tools and tests."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any

from processors.report.figures import TREND_DROP, TREND_WEEKS

DATA_ID = "nudgeflow-report-data"


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.total td{font-weight:bold;background:#fafafa}
tr.falling td{background:#fde8e8}.muted{color:#888}img{max-width:100%;margin:.5em 0}
td.text{max-width:40em;white-space:pre-wrap;font-family:ui-monospace,monospace}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: object) -> str:
    return "n/a" if x is None else str(x)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if abs(seconds) < 120:
        return f"{seconds:.0f}s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _cell(name: str, value: object, text: str, cls: str = "") -> str:
    raw = "" if value is None else (json.dumps(value) if not isinstance(value, str) else value)
    klass = f' class="{cls}"' if cls else ""
    return f'<td{klass} data-figure="{_e(name)}" data-value="{_e(raw)}">{_e(text)}</td>'


# Columns that exist only when their source does; when it is missing the page says why.
UNKNOWN_WHY = {
    "deliveries": "delivered: no delivery receipts in this input (the demo's outbox gateway "
    "sends none; with Vonage they come from the delivery webhook)",
    "clicks": "clicked: no events to find the link clicks in",
    "conversions": "converted, conversion rates, lift and revenue: no events to attribute "
    "conversions with",
    "opt_outs": "STOP replies: no opt_outs.jsonl in this input",
}
REASON_WORDS = {
    "holdout": "holdout (control group: decided, kept unsent on purpose)",
    "frequency_cap": "frequency cap (too many texts to this person recently)",
    "opted_out": "opted out (said STOP)",
    "no_consent": "no consent on file (unknown)",
    "no_contact": "no contact profile or phone number",
    "stale": "quiet hours would hold it past the campaign's max_defer",
    "quiet_hours": "quiet hours (dropped)",
    "converted": "converted before the text was due (exit)",
}


def _why(reason: str) -> str:
    status, _sep, why = reason.partition(":")
    return REASON_WORDS.get(why, f"{status}: {why}" if why else status)


def _lag_text(r: dict[str, Any]) -> str:
    if not r["sent"]:
        return "no texts sent"
    if r["median_trigger_to_send_s"] is None:
        return "unknown: no trigger event times"
    return _duration(r["median_trigger_to_send_s"])


def _rate(rate: float | None, n: int, empty: str) -> str:
    """A rate, or why there is none: ``empty`` when its denominator is 0, else "unknown"."""
    if not n:
        return empty
    return "unknown" if rate is None else _pct(rate)


def _lift_text(r: dict[str, Any]) -> str:
    lift = r["lift"]
    if lift is None:
        return str(r.get("lift_why") or "not computable")
    return f"{100 * lift['diff']:+.1f} pp [{100 * lift['low']:+.1f}, {100 * lift['high']:+.1f}]"


def _columns(known: dict[str, bool]) -> list[tuple[str, str, str]]:
    """(figure, header, source) of the campaign table; source "" = always known."""
    cols = [
        ("decisions", "decisions", ""), ("not_sent", "not sent (status: reason)", ""),
        ("sent", "sent", ""), ("delivered", "delivered", "deliveries"),
        ("clicked", "clicked", "clicks"), ("converted", "converted", "conversions"),
        ("conversion_rate", "conv. rate", "conversions"), ("holdout", "holdout", ""),
        ("holdout_rate", "holdout rate", "conversions"),
        ("lift", "lift over holdout [95% CI]", "conversions"),
        ("revenue", "revenue", "conversions"), ("stops", "STOP replies", "opt_outs"),
        ("median_trigger_to_send_s", "median trigger&rarr;send", ""),
    ]  # fmt: skip
    return [c for c in cols if not c[2] or known[c[2]]]


def _row_html(r: dict[str, Any], total: bool, known: dict[str, bool]) -> str:
    not_sent = ", ".join(f"{k.rstrip(':')}: {n}" for k, n in r["not_sent"].items()) or "-"
    variant = "all" if total else (r["variant"] or "-")
    texts = {
        "not_sent": not_sent,
        "conversion_rate": _rate(r["conversion_rate"], r["sent"], "no texts sent"),
        "holdout_rate": _rate(r["holdout_rate"], r["holdout"], "no holdout"),
        "lift": _lift_text(r),
        "median_trigger_to_send_s": _lag_text(r),
    }
    cells = [f'<td class="l">{_e(r["campaign_id"])}</td>', f'<td class="l">{_e(variant)}</td>']
    for name, _head, _src in _columns(known):
        cls = "l" if name in ("not_sent", "lift") else ""
        cells.append(_cell(name, r[name], texts.get(name, _num(r[name])), cls))
    attrs = (
        f'data-campaign="{_e(r["campaign_id"])}" '
        f'data-variant="{_e("*" if total else (r["variant"] or ""))}"'
    )
    return f'<tr class="{"total" if total else ""}" {attrs}>{"".join(cells)}</tr>'


def _img(images: dict[str, str], name: str, alt: str) -> str:
    data = images.get(name)
    return (
        f'<img id="chart-{name}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        if data
        else ""
    )


def _table(table_id: str, head: str, rows: Iterable[str]) -> str:
    """``<table id=...>`` with one header row of ``head`` cells and the rows as given."""
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
        "</table>"
    )


def _lift_table(fig_data: dict[str, Any]) -> str:
    rows = []
    for c in fig_data["campaigns"]:
        lift = c["lift"]
        if lift is None:
            verdict = str(c.get("lift_why") or "not computable")
        elif lift["significant"]:
            verdict = "significant: the interval excludes 0" + (
                "" if lift["diff"] > 0 else " (the text does worse than no text)"
            )
        else:
            verdict = "not significant: the interval includes 0"
        rows.append(
            f'<tr data-campaign="{_e(c["campaign_id"])}" '
            f'data-has-lift="{str(lift is not None).lower()}">'
            f"<td class=l>{_e(c['campaign_id'])}</td><td>{c['sent']}</td>"
            f"<td>{_e(_rate(c['conversion_rate'], c['sent'], 'no texts sent'))}</td>"
            f"<td>{c['holdout']}</td>"
            f"<td>{_e(_rate(c['holdout_rate'], c['holdout'], 'no holdout'))}</td>"
            f'<td class=l data-figure="lift">{_e(_lift_text(c))}</td>'
            f"<td class=l>{_e(verdict)}</td></tr>"
        )
    return _table(
        "lift",
        "<th class=l>campaign</th><th>sent</th><th>conv. rate with text</th><th>holdout</th>"
        "<th>conv. rate without text (holdout)</th><th class=l>lift [95% CI]</th>"
        "<th class=l>verdict</th>",
        rows,
    )


def _lag_table(fig_data: dict[str, Any]) -> str:
    rows = []
    for c in fig_data["campaigns"]:
        q = c["trigger_to_send_s"]
        if q is None:
            cells = '<td class=l colspan="6">no texts sent</td>'
        else:
            cells = "".join(
                f"<td>{_duration(q[k])}</td>" for k in ("p10", "p25", "p50", "p75", "p90", "max")
            )
        rows.append(
            f'<tr data-campaign="{_e(c["campaign_id"])}">'
            f"<td class=l>{_e(c['campaign_id'])}</td>{cells}</tr>"
        )
    return _table(
        "lags",
        "<th class=l>campaign</th><th>10%</th><th>25%</th><th>median</th><th>75%</th>"
        "<th>90%</th><th>slowest</th>",
        rows,
    )


def _experiments_html(fig_data: dict[str, Any]) -> str:
    exps = fig_data["experiments"]
    if not exps:
        return "<p>No campaign in this input has variants: there is no A/B test to compare.</p>"
    rows_by = {(r["campaign_id"], r["variant"]): r for r in fig_data["rows"]}
    out = []
    for x in exps:
        cells = []
        for v in x["variants"]:
            r = rows_by[(x["campaign_id"], v)]
            click = _rate(r["click_rate"], r["sent"], "-")
            conv = _rate(r["conversion_rate"], r["sent"], "-")
            cells.append(
                f"<b>{_e(v)}</b>: {r['sent']} sent, clicked {_e(click)}, converted {_e(conv)}, "
                f"median trigger&rarr;send {_e(_lag_text(r))}"
            )
        conv = x["conversion"]
        diff = (
            f"{_e(conv['leader'])} &minus; {_e(conv['other'])}: {100 * conv['diff']:+.1f} pp "
            f"[{100 * conv['low']:+.1f}, {100 * conv['high']:+.1f}]"
            if conv
            else "-"
        )
        out.append(
            f'<tr data-campaign="{_e(x["campaign_id"])}" data-kind="{_e(x["kind"])}">'
            f"<td class=l>{_e(x['campaign_id'])}</td><td class=l>{_e(x['kind'])}</td>"
            f"<td class=l>{'<br>'.join(cells)}</td><td class=l>{diff}</td>"
            f"<td class=l>{_e(x['verdict'])}</td></tr>"
        )
    return _table(
        "experiments",
        "<th class=l>campaign</th><th class=l>tests</th><th class=l>variants</th>"
        "<th class=l>conversion difference [95% CI]</th><th class=l>verdict</th>",
        out,
    )


def _suppressed_html(fig_data: dict[str, Any]) -> str:
    rows = []
    for c in fig_data["campaigns"]:
        reasons = sorted(c["not_sent"].items(), key=lambda kv: -kv[1])
        if not c["decisions"]:
            continue
        text = (
            "; ".join(f"{_why(k)}: {n}" for k, n in reasons) or "nothing: every decision was sent"
        )
        share = 1 - c["sent"] / c["decisions"]
        rows.append(
            f'<tr data-campaign="{_e(c["campaign_id"])}"><td class=l>{_e(c["campaign_id"])}</td>'
            f"<td>{c['decisions']}</td><td>{_pct(share)}</td><td class=l>{_e(text)}</td></tr>"
        )
    return _table(
        "suppressed",
        "<th class=l>campaign</th><th>decisions</th><th>not sent</th><th class=l>why</th>",
        rows,
    )


def _samples_html(fig_data: dict[str, Any]) -> str:
    if not fig_data["samples"]:
        return "<p>No texts to show: this input has no outbox (the texts as they were sent).</p>"
    rows = "".join(
        f'<tr data-campaign="{_e(x["campaign_id"])}"><td class=l>{_e(x["campaign_id"])}</td>'
        f"<td class=l>{_e(x['variant'] or '-')}</td><td class=l>{_e(x['sent_at'])}</td>"
        f'<td class="l text">{_e(x["text"])}</td></tr>'
        for x in fig_data["samples"]
    )
    return _table(
        "samples",
        "<th class=l>campaign</th><th class=l>variant</th><th class=l>sent (UTC)</th>"
        "<th class=l>text</th>",
        [rows],
    )


def _trends_html(fig_data: dict[str, Any]) -> str:
    if not fig_data["known"]["conversions"]:
        return "<p>Cannot tell: no events to attribute conversions with.</p>"
    trend_rows = []
    for t in fig_data["trends"]:
        weeks = ", ".join(
            f"{w['week']}: {w['converted']}/{w['sent']} ({_pct(w['rate'])})" for w in t["weeks"]
        )
        if t["falling"]:
            flag = "FALLING"
        elif t["enough_data"]:
            flag = "ok"
        else:
            flag = (
                "too early to tell: sends in one week only; the flag compares the latest week "
                "with earlier ones"
            )
        earlier = _pct(t["earlier_rate"]) if t["earlier_rate"] is not None else "no earlier week"
        klass = "falling" if t["falling"] else ""
        trend_rows.append(
            f'<tr class="{klass}" data-campaign="{_e(t["campaign_id"])}"'
            f' data-falling="{str(t["falling"]).lower()}"><td class=l>{_e(t["campaign_id"])}</td>'
            f"<td class=l>{_e(weeks)}</td><td>{_e(earlier)}</td>"
            f"<td class=l>{_e(flag)}</td></tr>"
        )
    head = (
        f"<th class=l>campaign</th><th class=l>last {TREND_WEEKS} weeks (converted/sent)</th>"
        "<th>earlier weeks' rate</th><th class=l>flag</th>"
    )
    return _table("trends", head, trend_rows) + (
        f'<p class="muted">Flagged FALLING when the latest week\'s conversion rate is at least '
        f"{int(TREND_DROP * 100)}% below the pooled rate of the earlier weeks shown.</p>"
    )


def render_html(fig_data: dict[str, Any], images: dict[str, str]) -> str:
    """The page. Every number shown is also in the embedded JSON block (id ``DATA_ID``)."""
    known = fig_data["known"]
    cols = _columns(known)
    head = (
        "<tr><th class=l>campaign</th><th class=l>variant</th>"
        + "".join(
            f"<th{' class=l' if n in ('not_sent', 'lift') else ''}>{h}</th>" for n, h, _s in cols
        )
        + "</tr>"
    )
    body = []
    for c in fig_data["campaigns"]:
        cid = c["campaign_id"]
        body += [_row_html(r, False, known) for r in fig_data["rows"] if r["campaign_id"] == cid]
        if c["has_variants"]:
            body.append(_row_html(c, True, known))
    missing = [
        UNKNOWN_WHY[k] for k in ("deliveries", "clicks", "conversions", "opt_outs") if not known[k]
    ]
    missing_html = (
        "<p>Not in this table, and why: " + "; ".join(_e(m) for m in missing) + ".</p>"
        if missing
        else ""
    )
    quiet = fig_data["quiet_hours"]
    quiet_text = f"{quiet[0]:02d}:00&ndash;{quiet[1]:02d}:00" if quiet else "none configured"
    local = (
        _img(images, "local_hours", "sends by recipient's local hour")
        if known["zones"]
        else "<p>The recipients' time zones are not in this input (zones.jsonl), so sends are "
        "shown by UTC hour only.</p>"
    )
    notes = "".join(f"<li>{_e(n)}</li>" for n in fig_data["notes"])
    blob = json.dumps(fig_data, sort_keys=True).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>NudgeFlow report</title>
<style>{_CSS}</style></head><body>
<h1>NudgeFlow report</h1>
<p class="muted">Source: {_e(fig_data["source"])} &middot;
generated {_e(fig_data["generated_at"])}</p>
<h2>Does a text convert better than no text?</h2>
{_lift_table(fig_data)}
<p class="muted">Conversion rate = sent texts with at least one conversion attributed (last touch:
within the campaign's after_send window of the text, or after_click of a click on its link) /
sent texts. The holdout (never sent, decided before consent and caps are checked) is attributed
the same way against its suppressed decision. Lift = conversion rate &minus; holdout rate, in
percentage points, with a 95% {_e(fig_data["interval"].split(",")[0])} interval; significant
when the interval excludes 0.</p>
{_img(images, "lift", "lift over holdout")}
<h2>Campaigns and variants</h2>
<table id="campaigns"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>
{missing_html}
{_img(images, "funnel", "funnel")}
<h2>How fast the text followed the action</h2>
<p class="muted">Time from the event that made the decision to the send (quiet hours and caps
included), as a distribution per campaign.</p>
{_lag_table(fig_data)}
{_img(images, "lags", "trigger to send distribution")}
<h2>Which copy and which timing won</h2>
{_experiments_html(fig_data)}
<h2>When texts arrive: sends by the recipient's local hour</h2>
<p class="muted">Quiet hours (recipient's local time): {quiet_text}, shaded.</p>
{local}
{_img(images, "hours", "sends by UTC hour")}
<h2>What was not sent, and why</h2>
{_suppressed_html(fig_data)}
<h2>Texts as they were sent</h2>
{_samples_html(fig_data)}
<h2>Triggers losing value</h2>
{_trends_html(fig_data)}
{_img(images, "trends", "weekly conversion rate")}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<script type="application/json" id="{DATA_ID}">{blob}</script>
</body></html>
"""


def read_report_data(page: str) -> dict[str, Any]:
    """The figures embedded in a report page (for tools and tests)."""
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    start = page.index(start_tag) + len(start_tag)
    end = page.index("</script>", start)
    result: dict[str, Any] = json.loads(page[start:end])
    return result
