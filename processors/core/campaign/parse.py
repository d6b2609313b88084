"""The campaign file: loaded from YAML and validated once, into the :mod:`.model` values.

Every error names the campaign and the field, e.g.
``campaign 'cart-recovery': trigger.after: invalid duration 'soon'``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from processors.core.campaign.model import (
    DEFAULT_AFTER_CLICK_MS,
    DEFAULT_AFTER_SEND_MS,
    DEFAULT_MAX_DEFER_MS,
    DEFAULT_MAX_SEGMENTS,
    MAX_SEGMENTS_LIMIT,
    TEMPLATE_NAMES,
    AbsenceTrigger,
    AttributionWindows,
    Audience,
    Campaign,
    CampaignError,
    CampaignSet,
    EventTrigger,
    Message,
    RepeatTrigger,
    Trigger,
    Variant,
)
from processors.core.cap import CapError, CapRule, parse_caps
from processors.core.durations import parse_duration
from processors.core.quiet_hours import QuietHours, QuietHoursError, parse_quiet_hours
from processors.core.rendering import TemplateError, TooLong, check_static_length

STAGES = {"prospect", "first_time_buyer", "repeat_customer", "inactive", "high_intent"}
_TRIGGER_KEYS = {
    "absence": {"type", "start", "cancel", "after", "where"},
    "repeat": {"type", "event", "count", "within", "group_by", "cooldown", "delay", "where"},
    "event": {"type", "event", "delay", "wait_until", "before", "cancel", "cooldown", "where"},
}
_CAMPAIGN_KEYS = {
    "id", "trigger", "message", "enabled", "priority", "audience", "variants", "holdout",
    "caps", "quiet_hours", "max_defer", "max_segments", "conversion", "attribution",
}  # fmt: skip


class _Ctx:
    """Builds error messages that name the campaign and the field."""

    def __init__(self, campaign_id: str) -> None:
        self.cid = campaign_id

    def error(self, where: str, what: str) -> CampaignError:
        return CampaignError(f"campaign {self.cid!r}: {where}: {what}")

    def duration(
        self, raw: dict[str, Any], key: str, where: str, default: int | None = None
    ) -> int:
        if key not in raw or raw[key] is None:
            if default is None:
                raise self.error(f"{where}.{key}", "is required (e.g. 30m)")
            return default
        try:
            return parse_duration(raw[key])
        except ValueError as exc:
            raise self.error(f"{where}.{key}", str(exc)) from None

    def names(self, raw: dict[str, Any], key: str, where: str, required: bool) -> frozenset[str]:
        value = raw.get(key)
        if value is None:
            if required:
                raise self.error(f"{where}.{key}", "is required (an event type or a list)")
            return frozenset()
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise self.error(f"{where}.{key}", "must be an event type or a list of event types")
        return frozenset(value)

    def event(self, raw: dict[str, Any], where: str) -> str:
        value = raw.get("event")
        if not isinstance(value, str) or not value:
            raise self.error(f"{where}.event", "is required (an event type)")
        return value

    def where(self, raw: dict[str, Any], where: str) -> dict[str, str]:
        value = raw.get("where") or {}
        if not isinstance(value, dict):
            raise self.error(f"{where}.where", "must be a mapping of property: value")
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}


def _trigger(ctx: _Ctx, raw: Any) -> Trigger:
    if not isinstance(raw, dict):
        raise ctx.error("trigger", "is required (a mapping with a type)")
    kind = raw.get("type")
    if kind not in _TRIGGER_KEYS:
        raise ctx.error("trigger.type", f"must be one of absence, repeat, event (got {kind!r})")
    unknown = set(raw) - _TRIGGER_KEYS[kind]
    if unknown:
        raise ctx.error("trigger", f"unknown field(s) for {kind}: {', '.join(sorted(unknown))}")
    w = "trigger"
    if kind == "absence":
        start = ctx.names(raw, "start", w, required=True)
        cancel = ctx.names(raw, "cancel", w, required=True)
        if start & cancel:
            raise ctx.error("trigger.cancel", "an event type cannot both start and cancel")
        after = ctx.duration(raw, "after", w)
        if after <= 0:
            raise ctx.error("trigger.after", "must be greater than 0")
        return AbsenceTrigger(start, cancel, after, ctx.where(raw, w))
    if kind == "repeat":
        count = raw.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ctx.error("trigger.count", "must be a positive integer")
        within = ctx.duration(raw, "within", w)
        group_by = raw.get("group_by")
        if group_by is not None and (not isinstance(group_by, str) or not group_by):
            raise ctx.error("trigger.group_by", "must be a property name")
        return RepeatTrigger(
            event=ctx.event(raw, w),
            count=count,
            within_ms=within,
            cooldown_ms=ctx.duration(raw, "cooldown", w, default=within),
            delay_ms=ctx.duration(raw, "delay", w, default=0),
            group_by=group_by,
            where=ctx.where(raw, w),
        )
    wait_until = raw.get("wait_until")
    if wait_until is not None and (not isinstance(wait_until, str) or not wait_until):
        raise ctx.error("trigger.wait_until", "must be the name of a property holding an ISO time")
    if wait_until is not None and "delay" in raw:
        raise ctx.error("trigger", "use either delay or wait_until, not both")
    if "before" in raw and wait_until is None:
        raise ctx.error("trigger.before", "only applies with wait_until")
    return EventTrigger(
        event=ctx.event(raw, w),
        delay_ms=ctx.duration(raw, "delay", w, default=0),
        wait_until=wait_until,
        before_ms=ctx.duration(raw, "before", w, default=0),
        cancel=ctx.names(raw, "cancel", w, required=False),
        cooldown_ms=ctx.duration(raw, "cooldown", w, default=0),
        where=ctx.where(raw, w),
    )


def _audience(ctx: _Ctx, raw: Any) -> Audience | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "stage" not in raw:
        raise ctx.error("audience", f"must be a mapping with a stage ({', '.join(sorted(STAGES))})")
    stage = raw["stage"]
    if stage not in STAGES:
        raise ctx.error("audience.stage", f"unknown stage {stage!r}; one of {sorted(STAGES)}")
    days = raw.get("days")
    if stage == "inactive":
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ctx.error("audience.days", "inactive needs days: a positive integer")
    elif days is not None:
        raise ctx.error("audience.days", "only applies to stage inactive")
    unknown = set(raw) - {"stage", "days"}
    if unknown:
        raise ctx.error("audience", f"unknown field(s): {', '.join(sorted(unknown))}")
    return Audience(stage=stage, days=days)


def _message(ctx: _Ctx, raw: Any) -> Message:
    if raw is None:
        raise ctx.error("message", "is required (a mapping with a template)")
    if not isinstance(raw, dict) or not isinstance(raw.get("template"), str):
        raise ctx.error("message.template", "is required (a string)")
    footer = raw.get("footer", "Reply STOP to opt out")
    if footer is not None and not isinstance(footer, str):
        raise ctx.error("message.footer", "must be a string")
    unknown = set(raw) - {"template", "footer"}
    if unknown:
        raise ctx.error("message", f"unknown field(s): {', '.join(sorted(unknown))}")
    return Message(template=raw["template"], footer=footer)


def _guaranteed_properties(trigger: Trigger) -> set[str]:
    """Event properties a trigger guarantees (its ``where`` keys, ``group_by``, ``wait_until``)."""
    names = set(trigger.where)
    for attr in ("group_by", "wait_until"):
        value = getattr(trigger, attr, None)
        if value:
            names.add(value)
    return names


def _unguarded_variables(source: str) -> set[str]:
    """Top-level names used with neither ``| default(...)`` nor an ``is defined`` test."""
    env = ImmutableSandboxedEnvironment()
    try:
        ast = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template syntax error on line {exc.lineno}: {exc.message}", reason="syntax"
        ) from None
    guarded: set[str] = set()
    for flt in ast.find_all(nodes.Filter):
        if flt.name in ("default", "d") and isinstance(flt.node, nodes.Name):
            guarded.add(flt.node.name)
    for test in ast.find_all(nodes.Test):
        if test.name in ("defined", "undefined", "none") and isinstance(test.node, nodes.Name):
            guarded.add(test.node.name)
    return set(meta.find_undeclared_variables(ast)) - guarded


def _check_template(ctx: _Ctx, message: Message, trigger: Trigger, max_segments: int) -> None:
    """Load-time checks: syntax, variables that may be missing, fixed text already too long."""
    try:
        unknown = _unguarded_variables(message.template) - TEMPLATE_NAMES
        unknown -= _guaranteed_properties(trigger)
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ctx.error(
                "message.template",
                f"variable(s) {names} may be missing (not a contact or decision field); "
                f"give a fallback, e.g. {{{{ {sorted(unknown)[0]} | default('...') }}}}",
            )
        check_static_length(message.template, message.footer, max_segments)
    except TooLong as exc:
        raise ctx.error(
            "message.template",
            f"the fixed text (footer included) already needs {exc.segments} {exc.encoding} "
            f"segments, max_segments is {exc.max_segments}",
        ) from None
    except TemplateError as exc:
        raise ctx.error("message.template", str(exc)) from None


def _caps(ctx: _Ctx | None, raw: Any, scope: str) -> tuple[CapRule, ...]:
    try:
        return tuple(parse_caps(raw, scope))
    except CapError as exc:
        if ctx is None:
            raise CampaignError(f"campaign file: {exc}") from None
        raise ctx.error("caps", str(exc)) from None


def _quiet(ctx: _Ctx | None, raw: Any) -> QuietHours:
    try:
        return parse_quiet_hours(raw)
    except QuietHoursError as exc:
        if ctx is None:
            raise CampaignError(f"campaign file: {exc}") from None
        raise ctx.error("quiet_hours", str(exc)) from None


def _max_segments(ctx: _Ctx, raw: Any) -> int:
    value = raw.get("max_segments", DEFAULT_MAX_SEGMENTS)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_SEGMENTS_LIMIT
    ):
        raise ctx.error("max_segments", f"must be an integer from 1 to {MAX_SEGMENTS_LIMIT}")
    return value


def parse_campaign(raw: Any, index: int) -> Campaign:
    if not isinstance(raw, dict):
        raise CampaignError(f"campaign #{index + 1}: must be a mapping")
    cid = raw.get("id")
    if not isinstance(cid, str) or not cid.strip():
        raise CampaignError(f"campaign #{index + 1}: id: is required (a non-empty string)")
    ctx = _Ctx(cid)
    unknown = set(raw) - _CAMPAIGN_KEYS
    if unknown:
        raise ctx.error("campaign", f"unknown field(s): {', '.join(sorted(unknown))}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ctx.error("enabled", "must be true or false")
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ctx.error("priority", "must be an integer")
    trigger = _trigger(ctx, raw.get("trigger"))
    message = _message(ctx, raw.get("message"))
    max_segments = _max_segments(ctx, raw)
    _check_template(ctx, message, trigger, max_segments)
    try:
        max_defer = parse_duration(raw.get("max_defer") or DEFAULT_MAX_DEFER_MS // 1000)
    except ValueError as exc:
        raise ctx.error("max_defer", str(exc)) from None
    return Campaign(
        id=cid,
        trigger=trigger,
        message=message,
        enabled=enabled,
        priority=priority,
        audience=_audience(ctx, raw.get("audience")),
        raw=raw,
        caps=_caps(ctx, raw.get("caps"), cid),
        quiet_hours=_quiet(ctx, raw["quiet_hours"]) if raw.get("quiet_hours") is not None else None,
        max_defer_ms=max_defer,
        max_segments=max_segments,
        variants=_variants(ctx, raw.get("variants"), trigger, message, max_segments),
        holdout=_holdout(ctx, raw.get("holdout")),
        conversion=_conversion(ctx, raw.get("conversion")),
        attribution=_attribution(ctx, raw.get("attribution")),
    )


def _conversion(ctx: _Ctx, raw: Any) -> frozenset[str] | None:
    """``conversion: [purchase]`` (or one event type); None when left out (the default)."""
    if raw is None:
        return None
    value = [raw] if isinstance(raw, str) else raw
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ctx.error("conversion", "must be an event type or a non-empty list of event types")
    return frozenset(value)


def _attribution(ctx: _Ctx, raw: Any) -> AttributionWindows:
    """``{after_send: 24h, after_click: 5d}``; either key may be left out."""
    if raw is None:
        return AttributionWindows()
    if not isinstance(raw, dict):
        raise ctx.error("attribution", "must be a mapping like {after_send: 24h, after_click: 5d}")
    unknown = set(raw) - {"after_send", "after_click"}
    if unknown:
        raise ctx.error(
            "attribution",
            f"unknown field(s): {', '.join(sorted(map(str, unknown)))} "
            "(allowed: after_send, after_click)",
        )
    windows = AttributionWindows(
        after_send_ms=ctx.duration(raw, "after_send", "attribution", DEFAULT_AFTER_SEND_MS),
        after_click_ms=ctx.duration(raw, "after_click", "attribution", DEFAULT_AFTER_CLICK_MS),
    )
    for key, ms in (("after_send", windows.after_send_ms), ("after_click", windows.after_click_ms)):
        if ms <= 0:
            raise ctx.error(f"attribution.{key}", "must be greater than 0")
    return windows


_VARIANT_OVERRIDES = {
    "absence": {"after"},
    "repeat": {"delay", "within", "count"},
    "event": {"delay"},
}


def _variants(
    ctx: _Ctx, raw: Any, trigger: Trigger, message: Message, max_segments: int
) -> tuple[Variant, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ctx.error("variants", "must be a non-empty list of {id, weight, ...}")
    out: list[Variant] = []
    for i, v in enumerate(raw):
        where = f"variants[{i}]"
        if not isinstance(v, dict) or not isinstance(v.get("id"), str) or not v["id"]:
            raise ctx.error(f"{where}.id", "is required (a string)")
        weight = v.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            raise ctx.error(f"{where}.weight", "must be a positive integer")
        allowed = _VARIANT_OVERRIDES[trigger.type]
        unknown = set(v) - {"id", "weight", "message"} - allowed
        if unknown:
            raise ctx.error(
                where,
                f"cannot override {', '.join(sorted(unknown))} of a {trigger.type} trigger "
                f"(can override: {', '.join(sorted(allowed | {'message'}))})",
            )
        changes: dict[str, Any] = {}
        for key in ("after", "delay", "within"):
            if key in v:
                changes[f"{key}_ms"] = ctx.duration(v, key, where)
        if "count" in v:
            if isinstance(v["count"], bool) or not isinstance(v["count"], int) or v["count"] < 1:
                raise ctx.error(f"{where}.count", "must be a positive integer")
            changes["count"] = v["count"]
        if changes.get("after_ms", 1) <= 0:
            raise ctx.error(f"{where}.after", "must be greater than 0")
        v_message = _message(ctx, v["message"]) if "message" in v else message
        if "message" in v:
            _check_template(ctx, v_message, trigger, max_segments)
        out.append(Variant(v["id"], weight, replace(trigger, **changes), v_message))
    ids = [v.id for v in out]
    if len(set(ids)) != len(ids):
        raise ctx.error("variants", "variant ids must be unique")
    return tuple(out)


def _holdout(ctx: _Ctx, raw: Any) -> float:
    """``10%`` or ``0.1``."""
    if raw is None:
        return 0.0
    text = str(raw).strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ctx.error("holdout", f"must be a share like 10% or 0.1, got {raw!r}") from None
    if not 0 <= value < 1:
        raise ctx.error("holdout", "must be at least 0% and below 100%")
    return value


def parse_campaigns(doc: Any) -> CampaignSet:
    if not isinstance(doc, dict) or not isinstance(doc.get("campaigns"), list):
        raise CampaignError("campaign file: must be a mapping with a 'campaigns' list")
    campaigns = tuple(parse_campaign(c, i) for i, c in enumerate(doc["campaigns"]))
    seen: set[str] = set()
    for c in campaigns:
        if c.id in seen:
            raise CampaignError(f"campaign {c.id!r}: id: is used twice")
        seen.add(c.id)
    caps = _caps(None, doc["caps"], "global") if doc.get("caps") is not None else None
    return CampaignSet(
        campaigns=campaigns, raw=doc, caps=caps, quiet_hours=_quiet(None, doc.get("quiet_hours"))
    )


def load_campaigns(path: str | Path) -> CampaignSet:
    """Read and validate a campaign file (YAML)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CampaignError(f"campaign file {p}: not found") from None
    except UnicodeDecodeError as exc:
        raise CampaignError(f"campaign file {p}: not UTF-8 (byte {exc.start})") from None
    except OSError as exc:  # a directory, no permission, ...
        raise CampaignError(f"campaign file {p}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise CampaignError(f"campaign file {p}: not valid YAML: {exc}") from None
    except RecursionError:
        raise CampaignError(f"campaign file {p}: not valid YAML: nested too deeply") from None
    return parse_campaigns(doc)
