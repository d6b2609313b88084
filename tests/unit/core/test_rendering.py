"""Segment counting at every billing boundary, template strictness and the sandbox."""

from __future__ import annotations

import pytest

from processors.core.rendering import (
    EmptyMessage,
    MissingVariable,
    TemplateError,
    TooLong,
    check_static_length,
    compile_template,
    compose_message,
    count_segments,
    detect_encoding,
    render,
    render_message,
    template_variables,
)

FOOTER = "Reply STOP to opt out"
EMOJI = "\U0001f6d2"  # shopping cart, outside the BMP: a surrogate pair in UTF-16


@pytest.mark.parametrize(
    ("length", "segments"),
    [(1, 1), (160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4)],
)
def test_gsm7_boundaries(length: int, segments: int) -> None:
    assert count_segments("a" * length) == ("GSM-7", segments, length)


@pytest.mark.parametrize(
    ("length", "segments"),
    [(1, 1), (70, 1), (71, 2), (134, 2), (135, 3), (201, 3), (202, 4)],
)
def test_ucs2_boundaries(length: int, segments: int) -> None:
    assert count_segments("ж" * length) == ("UCS-2", segments, length)


def test_empty_text_is_one_segment_of_nothing() -> None:
    assert count_segments("") == ("GSM-7", 1, 0)


def test_extension_chars_count_two_septets() -> None:
    for ch in "^{}\\[~]|€\f":
        assert detect_encoding(ch) == "GSM-7"
        assert count_segments(ch) == ("GSM-7", 1, 2)
    # 80 extension chars = 160 septets: still one message; one more septet tips it over.
    assert count_segments("€" * 80) == ("GSM-7", 1, 160)
    assert count_segments("€" * 80 + "a") == ("GSM-7", 2, 161)


def test_escape_sequence_not_split_across_parts() -> None:
    # 152 plain septets then "€": the escape pair would straddle part 1's 153rd septet, so it
    # moves to part 2. 152 + 2 + 152 = 306 septets, which would fit 2 parts if split naively.
    text = "a" * 152 + "€" + "a" * 152
    assert count_segments(text) == ("GSM-7", 3, 306)
    assert count_segments("a" * 151 + "€" + "a" * 153) == ("GSM-7", 2, 306)


def test_gsm_basic_specials_and_non_gsm_chars() -> None:
    assert detect_encoding("Ça coûte 5€ @ Ñandu ¿si? Δ") == "UCS-2"  # û is not GSM
    assert detect_encoding("Ça coute 5€ @ Ñandu ¿si? Δ è\n") == "GSM-7"
    assert detect_encoding("Ñandú") == "UCS-2"  # ú is not GSM either (é, è, ù are)
    assert detect_encoding("“smart quotes”") == "UCS-2"
    assert detect_encoding("\x1b") == "UCS-2"  # the raw ESC code is not text


def test_emoji_count_two_code_units_and_are_never_split() -> None:
    assert count_segments(EMOJI) == ("UCS-2", 1, 2)
    assert count_segments(EMOJI * 35) == ("UCS-2", 1, 70)
    assert count_segments(EMOJI * 35 + "a") == ("UCS-2", 2, 71)
    # 66 units then an emoji: the pair moves to part 2 (66 | 2+66 | 1) -> 3 parts for 135 units.
    assert count_segments("a" * 66 + EMOJI + "a" * 67) == ("UCS-2", 3, 135)
    assert count_segments("a" * 65 + EMOJI + "a" * 67) == ("UCS-2", 2, 134)


def test_default_filter_fills_missing_values() -> None:
    template = compile_template("Hi {{ first_name | default('there') }}!")
    assert render(template, {}) == "Hi there!"
    assert render(template, {"first_name": "Ana"}) == "Hi Ana!"


def test_missing_variable_names_it() -> None:
    template = compile_template("Hi {{ first_name }}, your {{ product }} is waiting")
    with pytest.raises(MissingVariable) as info:
        render(template, {"first_name": "Ana"})
    assert info.value.variable == "product"
    assert info.value.reason == "missing_variable"
    assert "product" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_variable_in_condition_is_an_error_too() -> None:
    with pytest.raises(MissingVariable):
        render(compile_template("{% if vip %}VIP{% endif %} deal"), {})
    template = compile_template("{% if vip is defined %}VIP {% endif %}deal")
    assert render(template, {}) == "deal"


def test_syntax_error_is_template_error() -> None:
    with pytest.raises(TemplateError) as info:
        compile_template("Hi {{ first_name ")
    assert info.value.reason == "syntax"
    assert "line 1" in str(info.value)
    with pytest.raises(TemplateError):
        template_variables("{% for x in y %}")


def test_template_variables() -> None:
    source = "Hi {{ first_name | default('there') }} {% for i in items %}{{ i.name }}{% endfor %}"
    assert template_variables(source) == {"first_name", "items"}


@pytest.mark.parametrize(
    "source",
    [
        "{{ first_name.__class__ }}",
        "{{ first_name.__class__.__mro__[1].__subclasses__() }}",
        "{{ first_name.upper.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ items.append(1) }}",
    ],
)
def test_sandbox_blocks_internals(source: str) -> None:
    template = compile_template(source)
    with pytest.raises(TemplateError):
        render(template, {"first_name": "Ana", "items": []})


def test_sandbox_security_reason() -> None:
    with pytest.raises(TemplateError) as info:
        render(compile_template("{{ first_name.__class__ }}"), {"first_name": "Ana"})
    assert info.value.reason == "unsafe"


def test_runtime_type_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError) as info:
        render(compile_template("{{ first_name + 1 }}"), {"first_name": "Ana"})
    assert info.value.reason == "render_failed"


def test_no_autoescape_and_trimmed() -> None:
    template = compile_template("  \n {{ name }} & <b>'s cart \n ")
    assert render(template, {"name": "Tom & Jerry"}) == "Tom & Jerry & <b>'s cart"


def test_compose_footer_only_when_asked() -> None:
    assert compose_message("Hello", FOOTER, add_footer=True) == f"Hello\n{FOOTER}"
    assert compose_message("Hello", FOOTER, add_footer=False) == "Hello"
    assert compose_message("Hello", None, add_footer=True) == "Hello"


def test_footer_counts_in_segments() -> None:
    template = compile_template("{{ body }}")
    body = "a" * (160 - len(FOOTER) - 1)  # body + newline + footer = exactly 160
    with_footer = render_message(template, {"body": body}, FOOTER, True, max_segments=1)
    assert with_footer.text == f"{body}\n{FOOTER}"
    assert (with_footer.encoding, with_footer.segments) == ("GSM-7", 1)
    with pytest.raises(TooLong) as info:
        render_message(template, {"body": body + "a"}, FOOTER, True, max_segments=1)
    assert info.value.reason == "too_long"
    assert (info.value.segments, info.value.max_segments) == (2, 1)
    without = render_message(template, {"body": body + "a"}, FOOTER, False, max_segments=1)
    assert without.text == body + "a" and without.segments == 1


def test_emoji_in_variable_switches_to_ucs2() -> None:
    template = compile_template("Your cart {{ icon }} is waiting")
    message = render_message(template, {"icon": EMOJI}, None, False, max_segments=1)
    assert (message.encoding, message.segments) == ("UCS-2", 1)
    with pytest.raises(TooLong):
        render_message(template, {"icon": EMOJI * 30}, None, False, max_segments=1)


def test_empty_body_refused() -> None:
    template = compile_template("{{ name | default('') }}")
    with pytest.raises(EmptyMessage) as info:
        render_message(template, {}, FOOTER, True, max_segments=1)
    assert info.value.reason == "empty"


def test_static_length_check() -> None:
    source = "Hi {{ first_name | default('there') }}! " + "x" * 150
    # Variables count as empty: "Hi ! " + 150 = 155 septets fits one segment without footer...
    assert check_static_length(source, None, 1) is not None
    # ...but not with the footer.
    with pytest.raises(TooLong):
        check_static_length(source, FOOTER, 1)
    assert check_static_length(source, FOOTER, 2) is not None
    with pytest.raises(TemplateError):
        check_static_length("{{ oops", None, 1)
    # Cannot be evaluated with empty strings: left to the per-send check.
    assert check_static_length("{{ count + 1 }} items", None, 1) is None
