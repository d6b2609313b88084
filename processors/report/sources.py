"""Where a :class:`ReportInput` comes from: a ``nudgeflow demo`` directory or the topics."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from processors.core.attribution import (
    AttributionError,
    Click,
    Conversion,
    Rules,
    Touch,
    attribute_all,
    click_target,
)
from processors.core.campaign import CampaignSet, load_campaigns
from processors.core.events import ClickEvent, parse_ts
from processors.core.outcome import SmsOutcome
from processors.files import LineErrors, read_events, read_parsed
from processors.report.inputs import (
    DecisionRow,
    ReportError,
    ReportInput,
    final_outcomes,
    fold_deliveries,
    parse_decision_line,
    parse_delivery_line,
    parse_outcome_line,
    text_field,
    touches_of,
)
from processors.topic_reader import read_to_end

# --------------------------------------------------------------------------- loading


def _lines(path: Path, parse: Any, notes: list[str]) -> list[Any]:
    errors = LineErrors(str(path), echo=None)
    rows = [row for _line, row in read_parsed(path, parse, errors)]
    for line, reason in errors.errors[:5]:
        notes.append(f"{path.name}:{line}: skipped: {reason}")
    if len(errors) > 5:
        notes.append(f"{path.name}: {len(errors) - 5} more bad lines skipped")
    return rows


def _campaigns(path: Path | None, fallback: Path | None) -> CampaignSet | None:
    for p in (path, fallback):
        if p is not None and p.exists():
            return load_campaigns(p)
    if path is not None:
        raise ReportError(f"campaign file {path}: not found")
    return None


def load_dir(
    directory: Path, events: Path | None = None, campaigns: Path | None = None
) -> tuple[ReportInput, list[ClickEvent] | None]:
    """Read a demo directory. Conversions come from attributing the events file offline
    (``--events``, default ``DIR/events.jsonl``), else from ``DIR/conversions.jsonl``."""
    from processors.settings import Settings

    decisions_file = directory / "decisions.jsonl"
    outcomes_file = directory / "outcomes.jsonl"
    for p in (decisions_file, outcomes_file):
        if not p.is_file():
            raise ReportError(f"{p}: no such file (is {directory} a `nudgeflow demo` output?)")
    if events is not None and not events.is_file():
        raise ReportError(f"events file {events}: not found")
    notes: list[str] = []
    decisions = {d.decision_id: d for d in _lines(decisions_file, parse_decision_line, notes)}
    outcomes = final_outcomes(_lines(outcomes_file, parse_outcome_line, notes))
    default_campaigns = directory / "campaigns.yaml"
    if not default_campaigns.exists():
        default_campaigns = Settings().campaigns_file
    cs = _campaigns(campaigns, default_campaigns)
    deliveries_file = directory / "deliveries.jsonl"
    deliveries = (
        fold_deliveries(_lines(deliveries_file, parse_delivery_line, notes))
        if deliveries_file.is_file()
        else None
    )
    events_file = events or directory / "events.jsonl"
    conversions: list[Conversion] | None = None
    clicks: dict[str, int] | None = None
    event_list: list[ClickEvent] | None = None
    if events_file.is_file():
        errors = LineErrors(str(events_file), echo=None)
        event_list = list(read_events(events_file, errors))
        if len(errors):
            notes.append(f"{events_file.name}: {len(errors)} bad lines skipped")
        result = attribute_all(event_list, touches_of(outcomes), Rules(cs.campaigns if cs else ()))
        conversions, clicks = result.conversions, result.clicks
        if result.bad_values:
            notes.append(f"{result.bad_values} conversion events had an unreadable value")
        _fill_trigger_ts(decisions, event_list)
    elif (directory / "conversions.jsonl").is_file():
        conversions = _lines(directory / "conversions.jsonl", Conversion.from_record, notes)
        notes.append("no events file: conversions read from conversions.jsonl, clicks unknown")
    else:
        notes.append("no events file: conversions and clicks are unknown")
    data = ReportInput(
        decisions, outcomes, conversions, clicks, deliveries, str(directory), cs, notes
    )
    _load_extras(directory, data)
    return data, event_list


def _load_extras(directory: Path, data: ReportInput) -> None:
    """Optional files of a demo directory: recipients' zones, the texts as sent, STOP replies."""

    def zone_line(obj: dict[str, Any]) -> tuple[str, str]:
        return text_field(obj, "user_id"), text_field(obj, "timezone")

    def text_line(obj: dict[str, Any]) -> tuple[str, str]:
        return text_field(obj, "decision_id"), text_field(obj, "text")

    def stop_line(obj: dict[str, Any]) -> tuple[str, int]:
        return text_field(obj, "user_id"), parse_ts(obj.get("at"))

    if (directory / "zones.jsonl").is_file():
        data.zones = dict(_lines(directory / "zones.jsonl", zone_line, data.notes))
    if (directory / "outbox.jsonl").is_file():
        data.texts = dict(_lines(directory / "outbox.jsonl", text_line, data.notes))
    if (directory / "opt_outs.jsonl").is_file():
        data.opt_outs = _lines(directory / "opt_outs.jsonl", stop_line, data.notes)


def _fill_trigger_ts(decisions: dict[str, DecisionRow], events: list[ClickEvent]) -> None:
    """decisions.jsonl has no trigger_ts: use the latest of the decision's trigger events."""
    ts = {e.event_id: e.ts for e in events}
    for key, d in list(decisions.items()):
        if d.trigger_ts is None:
            found = [ts[i] for i in d.trigger_event_ids if i in ts]
            if found:
                decisions[key] = DecisionRow(
                    d.decision_id, d.campaign_id, d.user_id, d.variant, d.fire_at,
                    max(found), d.trigger_event_ids,
                )  # fmt: skip


def load_kafka(settings: Any, timeout_s: float = 30.0) -> ReportInput:
    """Read decisions, outcomes, conversions, clicks and receipts to the topics' current end."""
    from confluent_kafka import Consumer

    from processors.core.decision import Decision, DecisionCancelled
    from schemas.codec import Codec, CodecError

    codec = Codec(settings.schema_registry_url)
    consumer = Consumer(
        {**settings.kafka_common(), "group.id": "nudgeflow-report", "enable.auto.commit": False}
    )
    notes: list[str] = []
    decisions: dict[str, DecisionRow] = {}
    outcomes: list[SmsOutcome] = []
    conversions: dict[str, Conversion] = {}
    raw_clicks: list[Click] = []
    receipts: list[tuple[str, str]] = []
    delivery_topic = getattr(settings, "topic_delivery", None)
    topics = [
        settings.topic_decisions,
        settings.topic_outcomes,
        settings.topic_conversions,
        settings.topic_clickstream,
    ]
    try:
        listed = consumer.list_topics(timeout=10).topics
        if delivery_topic and delivery_topic in listed:
            topics.append(delivery_topic)
        missing = [t for t in topics if t not in listed]
        if missing:
            raise ReportError(f"topic(s) {', '.join(missing)} do not exist")
        bad = 0
        try:
            for msg in read_to_end(consumer, topics, timeout_s):
                try:
                    name, rec = codec.decode(msg.value())
                    if name == "TriggerDecision":
                        d = Decision.from_record(rec)
                        decisions[d.decision_id] = DecisionRow(
                            d.decision_id, d.campaign_id, d.user_id, d.variant, d.fire_at,
                            d.trigger_ts, d.trigger_event_ids,
                        )  # fmt: skip
                    elif name == "DecisionCancelled":
                        c = DecisionCancelled.from_record(rec)
                        if c.reason == "reordered":
                            decisions.pop(c.decision_id, None)
                    elif name == "SmsOutcome":
                        outcomes.append(SmsOutcome.from_record(rec))
                    elif name == "Conversion":
                        conv = Conversion.from_record(rec)
                        conversions[conv.conversion_id] = conv
                    elif name == "ClickEvent":
                        click = Click.from_event(ClickEvent.from_record(rec))
                        if click is not None:
                            raw_clicks.append(click)
                    elif name == "DeliveryReceipt" and rec.get("decision_id"):
                        receipts.append(parse_delivery_line(rec))  # no id: not our text
                except (CodecError, ValueError, KeyError, AttributionError):
                    bad += 1
        except TimeoutError:
            raise ReportError("timed out reading the topics") from None
        if bad:
            notes.append(f"{bad} records could not be read and were skipped")
    finally:
        consumer.close()
    finals = final_outcomes(outcomes)
    touches: dict[str, list[Touch]] = defaultdict(list)
    for t in touches_of(finals):
        touches[t.user_id].append(t)
    clicks: dict[str, int] = Counter()
    for k in raw_clicks:
        target = click_target(k, touches.get(k.user_id, ()))
        if target is not None:
            clicks[target] += 1
    cs = _campaigns(None, getattr(settings, "campaigns_file", None))
    return ReportInput(
        decisions=decisions,
        outcomes=finals,
        conversions=sorted(conversions.values(), key=lambda c: (c.ts, c.conversion_id)),
        clicks=dict(clicks),
        deliveries=fold_deliveries(receipts) if delivery_topic in topics else None,
        source=f"Kafka {settings.bootstrap_servers}",
        campaigns=cs,
        notes=notes,
    )
