"""Compliance keywords: first word, case-insensitive, nothing else (processors.core.keywords)."""

from __future__ import annotations

import pytest

from processors.core.keywords import (
    HELP_WORDS,
    START_WORDS,
    STOP_WORDS,
    classify,
    first_word,
)


@pytest.mark.parametrize("word", sorted(STOP_WORDS))
def test_every_stop_word_opts_out_in_any_case(word: str) -> None:
    for text in (word, word.lower(), word.capitalize(), f"  {word}  ", f"{word}.", f"{word}!"):
        assert classify(text) == "stop", text


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("HELP", "help"),
        ("info", "help"),
        ("Start", "start"),
        ("unstop", "start"),
        ("yes", "start"),
        ("Yes please, text me", "start"),
        ("STOP sending me these", "stop"),
        ("stop-it", "stop"),
        ("*STOP*", "stop"),
        ("\n\tQuit", "stop"),
        ("ＳＴＯＰ", "stop"),  # full-width letters from some keyboards (NFKC)
        ("🛑 stop", "stop"),
    ],
)
def test_keywords_by_first_word(text: str, kind: str) -> None:
    assert classify(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        "please stop",  # not the first word: the user's tools decide
        "STOPS",
        "STOP2",
        "stopping by later",
        "Helpful, thanks",
        "yesterday was great",
        "ENDING",
        "",
        "   ",
        "123 STOP",
        None,
    ],
)
def test_anything_else_is_other(text: str | None) -> None:
    assert classify(text) == "other"


def test_first_word_is_upper_case_and_none_without_letters() -> None:
    assert first_word("  hello world") == "HELLO"
    assert first_word("Ça va") == "ÇA"
    assert first_word("!!!") is None
    assert first_word(None) is None


def test_word_sets_do_not_overlap() -> None:
    assert not (STOP_WORDS & HELP_WORDS or STOP_WORDS & START_WORDS or HELP_WORDS & START_WORDS)
