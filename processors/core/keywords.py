"""Compliance keywords of inbound texts: STOP-class, HELP-class, START-class, or anything else.

Carriers and the CTIA handbook match the *first word* of a reply, case-insensitively, so
"stop", "Stop." and "STOP sending me these" all opt out, while "please stop" does not (it goes to
the user's own tools on the inbound topic). The text is NFKC-normalised first, so full-width
"ＳＴＯＰ" typed on some Asian keyboards counts too. Pure: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final, Literal

KeywordKind = Literal["stop", "help", "start", "other"]

STOP_WORDS: Final = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
HELP_WORDS: Final = frozenset({"HELP", "INFO"})
START_WORDS: Final = frozenset({"START", "UNSTOP", "YES"})

# Leading whitespace/punctuation is skipped ("  STOP", "*STOP*"); the word is the first run of
# letters, so "STOP." and "stop!" match while "STOPS" or "STOP2" do not.
_FIRST_WORD = re.compile(r"^[\W_]*([^\W\d_]+)(?![\w])", re.UNICODE)


def first_word(text: str | None) -> str | None:
    """The first word of ``text`` in upper case (None when there is none)."""
    if not text:
        return None
    normalized = unicodedata.normalize("NFKC", text)
    match = _FIRST_WORD.match(normalized)
    return match.group(1).upper() if match else None


def classify(text: str | None) -> KeywordKind:
    """``stop`` / ``help`` / ``start`` by the first word of ``text``; ``other`` otherwise."""
    word = first_word(text)
    if word in STOP_WORDS:
        return "stop"
    if word in HELP_WORDS:
        return "help"
    if word in START_WORDS:
        return "start"
    return "other"
