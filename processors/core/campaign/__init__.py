"""The campaign file: what counts as an abandoned cart, a strong revisit, a dropped form…

Loaded from YAML and validated once (:mod:`.parse`) into immutable values (:mod:`.model`);
every error names the campaign and the field, e.g.
``campaign 'cart-recovery': trigger.after: invalid duration 'soon'``.
The names below are the package's API.
"""

from processors.core.campaign.model import (
    DEFAULT_AFTER_CLICK_MS,
    DEFAULT_AFTER_SEND_MS,
    DEFAULT_CONVERSION,
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
from processors.core.campaign.parse import (
    STAGES,
    load_campaigns,
    parse_campaign,
    parse_campaigns,
)

__all__ = [
    "DEFAULT_AFTER_CLICK_MS",
    "DEFAULT_AFTER_SEND_MS",
    "DEFAULT_CONVERSION",
    "DEFAULT_MAX_DEFER_MS",
    "DEFAULT_MAX_SEGMENTS",
    "MAX_SEGMENTS_LIMIT",
    "STAGES",
    "TEMPLATE_NAMES",
    "AbsenceTrigger",
    "AttributionWindows",
    "Audience",
    "Campaign",
    "CampaignError",
    "CampaignSet",
    "EventTrigger",
    "Message",
    "RepeatTrigger",
    "Trigger",
    "Variant",
    "load_campaigns",
    "parse_campaign",
    "parse_campaigns",
]
