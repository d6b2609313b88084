"""Contact and event data inside templates is text, never code.

The texts come out of the real send policy (``processors.core.policy.memory.simulate``: the
dispatcher's ordered policy over an in-memory store). Decision (documented in
``processors.core.rendering`` and ``docs/guarantees.md``): template syntax in a value is sent
literally; tabs and line breaks in a value become one space and other control characters (C0,
DEL, C1) are removed, so a name can neither add lines to a text nor carry terminal escapes;
right-to-left marks, bidi controls and emoji joiners are kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.core.campaign import CampaignSet, load_campaigns
from processors.core.contact import Contact
from processors.core.decision import Decision
from processors.core.policy.memory import Simulation, simulate
from processors.core.rendering import plain_text

FORMAT_CHARS = "\u200e\u200f\u202a\u202e\u2066\u2069\u200d"  # marks, bidi, joiner: kept
NOON = 1_710_331_200_000  # 2024-03-13T12:00:00Z: outside quiet hours in UTC
CAMPAIGNS = """
campaigns:
  - id: cart
    trigger: {type: absence, start: [add_to_cart], cancel: [purchase], after: 30m}
    message:
      template: "Hi {{ first_name | default('there') }}, you left {{ product_name | default('it') }} in your cart.\\nSee you!"
  - id: greedy
    trigger: {type: absence, start: [form_start], cancel: [form_submit], after: 30m}
    message:
      template: "Hi {{ attributes.pop('tier', '') }}"
"""  # noqa: E501


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory: pytest.TempPathFactory) -> CampaignSet:
    path = tmp_path_factory.mktemp("templates") / "campaigns.yaml"
    path.write_text(CAMPAIGNS)
    return load_campaigns(Path(path))


def _send(
    campaigns: CampaignSet,
    first_name: str | None,
    product_name: str = "shoes",
    campaign: str = "cart",
    attributes: dict[str, str] | None = None,
) -> Simulation:
    contact = Contact(
        user_id="u1",
        phone="+14155550100",
        consent="opted_in",
        timezone="UTC",
        first_name=first_name,
        attributes=attributes if attributes is not None else {},
    )
    decision = Decision(
        decision_id="d1",
        campaign_id=campaign,
        user_id="u1",
        fire_at=NOON,
        trigger_event_ids=("e1",),
        trigger_ts=NOON - 1_800_000,
        properties={"product_name": product_name},
    )
    return simulate([decision], [], campaigns, [contact])


def _text(campaigns: CampaignSet, first_name: str, product_name: str = "shoes") -> str:
    sim = _send(campaigns, first_name, product_name)
    assert [o.status for o in sim.outcomes] == ["sent"], sim.outcomes
    (message,) = sim.messages
    return message.text


@pytest.mark.parametrize(
    "first_name, shown",
    [
        ("{{ 7*7 }}", "{{ 7*7 }}"),
        ("{% for x in range(3) %}x{% endfor %}", "{% for x in range(3) %}x{% endfor %}"),
        ("{{ cycler.__init__.__globals__.os.system('id') }}",
         "{{ cycler.__init__.__globals__.os.system('id') }}"),
        ("{# hidden #}Ana", "{# hidden #}Ana"),
        ("{{ first_name }}", "{{ first_name }}"),  # no second round of rendering
        ("{%", "{%"),
        ("Ana\nReply YES to claim a prize", "Ana Reply YES to claim a prize"),
        ("Ana\r\n\r\n\tBob", "Ana Bob"),
        ("An\x00a\x07\x1b[31m!", "Ana[31m!"),
        ("Ana\x85Bob\u2028Cy\u2029Di\x0bEd", "Ana Bob Cy Di Ed"),
        ("\u202eana\u202c", "\u202eana\u202c"),  # bidi override kept: it is text
        ("\u200fשרה\u200f", "\u200fשרה\u200f"),  # right-to-left marks kept
        ("Zoë 👩\u200d💻", "Zoë 👩\u200d💻"),  # emoji joiner kept
    ],
)  # fmt: skip
def test_hostile_first_name_is_rendered_as_text(
    campaigns: CampaignSet, first_name: str, shown: str
) -> None:
    text = _text(campaigns, first_name)
    assert text == f"Hi {shown}, you left shoes in your cart.\nSee you!\nReply STOP to opt out"
    assert "49" not in text


def test_hostile_event_property_is_rendered_as_text(campaigns: CampaignSet) -> None:
    text = _text(campaigns, "Ana", product_name="{{ 7*7 }}\nSTOP? Never\x1b[0m")
    assert text.splitlines() == [
        "Hi Ana, you left {{ 7*7 }} STOP? Never[0m in your cart.",
        "See you!",  # the template's own line break stays
        "Reply STOP to opt out",
    ]


def test_sandbox_blocks_mutation_at_send_time_and_the_contact_is_untouched(
    campaigns: CampaignSet,
) -> None:
    attributes = {"tier": "gold"}
    sim = _send(campaigns, "Ana", campaign="greedy", attributes=attributes)
    assert [(o.status, o.reason) for o in sim.outcomes] == [("failed", "unsafe")]
    assert sim.messages == []
    assert attributes == {"tier": "gold"}


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("plain", "plain"),
        ("a\tb\nc\r\nd", "a b c d"),
        ("\x00\x01\x1f\x7f\x80\x9f", ""),
        ("x\u00a0y", "x\u00a0y"),  # a no-break space is not a control character
        (FORMAT_CHARS, FORMAT_CHARS),
    ],
)  # fmt: skip
def test_plain_text(raw: str, clean: str) -> None:
    assert plain_text(raw) == clean
