"""SMS text: sandboxed Jinja2 templates, GSM-7 / UCS-2 detection and segment counting.

Campaign authors write templates, so they run in Jinja's immutable sandbox with autoescape off
(SMS is plain text). Missing variables fail loudly (a text saying "Hi ," is worse than no text)
unless the template gives a fallback with ``| default(...)``.

Variable values (a contact's first name, event properties, attributes) are data, never template
code: Jinja does not evaluate what a variable holds, so ``{{ 7*7 }}`` in a first name is sent as
those characters. Before rendering, :func:`plain_text` removes control characters from every
string value, so a name cannot add lines to a text (e.g. a fake "Reply YES" line) or carry
terminal escapes: tabs and line breaks become one space, other C0/C1 controls and DEL are
dropped. Format characters such as right-to-left marks and emoji joiners are kept (names in
Hebrew or Arabic need them).

Segment counting mirrors what carriers bill: a single GSM-7 message holds 160 septets, each part
of a concatenated one 153 (the user-data header takes the rest); UCS-2 holds 70 / 67 UTF-16 code
units. An escape sequence (GSM extension character, 2 septets) or a surrogate pair (emoji, 2 code
units) is never split across parts, so a part may end one unit short of its capacity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import jinja2
from jinja2 import StrictUndefined, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

Encoding = Literal["GSM-7", "UCS-2"]

GSM7_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""GSM 03.38 default alphabet (1 septet each); the ESC code itself is not a text character."""

GSM7_EXTENSION: frozenset[str] = frozenset("^{}\\[~]|€\f")
"""GSM 03.38 extension table: ESC + code, so 2 septets each."""

GSM7_SINGLE_MAX = 160
GSM7_PART_MAX = 153
UCS2_SINGLE_MAX = 70
UCS2_PART_MAX = 67


class TemplateError(ValueError):
    """A template cannot be compiled or rendered; ``reason`` is a stable, log-safe code.

    Reasons: ``syntax``, ``missing_variable``, ``unsafe``, ``render_failed``, ``empty``,
    ``too_long``, ``invalid`` (bad arguments such as ``max_segments < 1``). Messages name
    variables and limits, never variable values.
    """

    def __init__(self, message: str, reason: str = "render_failed") -> None:
        super().__init__(message)
        self.reason = reason


class MissingVariable(TemplateError):
    """A variable used without ``| default(...)`` had no value."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message, reason="missing_variable")
        self.variable = variable


class EmptyMessage(TemplateError):
    """The body rendered to nothing but whitespace: an empty text is never what was meant."""

    def __init__(self, message: str = "template rendered an empty message body") -> None:
        super().__init__(message, reason="empty")


class TooLong(TemplateError):
    """The message needs more segments than the campaign allows."""

    def __init__(self, segments: int, max_segments: int, encoding: Encoding) -> None:
        super().__init__(
            f"message needs {segments} {encoding} segments, the limit is {max_segments}",
            reason="too_long",
        )
        self.segments = segments
        self.max_segments = max_segments
        self.encoding = encoding


# --------------------------------------------------------------------------- encoding / segments


def detect_encoding(text: str) -> Encoding:
    """GSM-7 when every character is in the basic or extension table, else UCS-2."""
    for ch in text:
        if ch not in GSM7_BASIC and ch not in GSM7_EXTENSION:
            return "UCS-2"
    return "GSM-7"


def _char_units(text: str, encoding: Encoding) -> Iterable[int]:
    """Per character: septets (GSM-7) or UTF-16 code units (UCS-2); indivisible within a part."""
    if encoding == "GSM-7":
        return (2 if ch in GSM7_EXTENSION else 1 for ch in text)
    return (2 if ord(ch) > 0xFFFF else 1 for ch in text)


def count_segments(text: str) -> tuple[Encoding, int, int]:
    """Return ``(encoding, segments, units)``; units are septets (GSM-7) or UTF-16 code units.

    Empty text counts as 1 segment of 0 units: that is what a carrier would bill for it (and
    ``render_message`` refuses empty bodies anyway).
    """
    encoding = detect_encoding(text)
    single, part_max = (
        (GSM7_SINGLE_MAX, GSM7_PART_MAX)
        if encoding == "GSM-7"
        else (UCS2_SINGLE_MAX, UCS2_PART_MAX)
    )
    sizes = list(_char_units(text, encoding))
    units = sum(sizes)
    if units <= single:
        return encoding, 1, units
    segments, used = 1, 0
    for size in sizes:
        if used + size > part_max:  # never split an escape sequence or a surrogate pair
            segments += 1
            used = 0
        used += size
    return encoding, segments, units


# --------------------------------------------------------------------------- variable values

_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain_text(value: str) -> str:
    """``value`` fit to appear inside a text: runs of tabs and line breaks (including Unicode
    line/paragraph separators) become one space, other control characters are removed."""
    return _CONTROLS.sub("", _BREAKS.sub(" ", value))


def _plain(value: object) -> object:
    if isinstance(value, str):
        return plain_text(value)
    if isinstance(value, Mapping):  # properties / attributes: one level of strings
        return {k: plain_text(v) if isinstance(v, str) else v for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- templates


class _UndefinedVariable(jinja2.UndefinedError):
    """Jinja's UndefinedError plus the name of the variable (or attribute) that was missing."""

    def __init__(self, message: str | None = None, variable: str = "?") -> None:
        super().__init__(message)
        self.variable = variable


class _StrictUndefined(StrictUndefined):
    """StrictUndefined whose error carries the missing name, so ours can report it.

    The ``default`` filter and ``is defined`` test still work: they inspect the Undefined
    object without rendering it.
    """

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = jinja2.runtime.missing,
        name: str | None = None,
        exc: type[jinja2.TemplateRuntimeError] = jinja2.UndefinedError,
    ) -> None:
        if exc is jinja2.UndefinedError:
            exc = partial(_UndefinedVariable, variable=name or "?")  # type: ignore[assignment]
        super().__init__(hint=hint, obj=obj, name=name, exc=exc)


def _environment(undefined: type[jinja2.Undefined]) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        autoescape=False,
        undefined=undefined,
        keep_trailing_newline=False,
    )


class _LoadTimeSandbox(ImmutableSandboxedEnvironment):
    """The load-time check's sandbox: an unsafe attribute raises at once. The default returns
    an Undefined that raises only when printed, and ChainableUndefined (needed so that every
    variable can stand in as "") never does, so the check would pass templates that fail on
    every send."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe."
        )


_ENV = _environment(_StrictUndefined)
_STATIC_ENV = _LoadTimeSandbox(
    autoescape=False, undefined=jinja2.ChainableUndefined, keep_trailing_newline=False
)


def compile_template(source: str) -> jinja2.Template:
    """Compile a campaign template in the sandbox; syntax errors become ``TemplateError``."""
    if not isinstance(source, str):
        raise TemplateError(
            f"template must be a string, got {type(source).__name__}", reason="syntax"
        )
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template syntax error on line {exc.lineno}: {exc.message}", reason="syntax"
        ) from None


def template_variables(source: str) -> set[str]:
    """Top-level names the template reads, for load-time checks against the allowed names."""
    try:
        return set(meta.find_undeclared_variables(_ENV.parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"template syntax error on line {exc.lineno}: {exc.message}", reason="syntax"
        ) from None


def render(template: jinja2.Template, variables: Mapping[str, object]) -> str:
    """Render with ``variables`` (string values through :func:`plain_text`); the result is
    whitespace-trimmed.

    Raises ``MissingVariable`` (names the variable), ``TemplateError(reason="unsafe")`` for
    sandbox violations and ``TemplateError(reason="render_failed")`` for anything else the
    template does wrong at runtime (e.g. adding a number to a string).
    """
    try:
        return template.render({k: _plain(v) for k, v in variables.items()}).strip()
    except SecurityError as exc:
        raise TemplateError(f"template blocked by sandbox: {exc}", reason="unsafe") from None
    except jinja2.UndefinedError as exc:
        name = exc.variable if isinstance(exc, _UndefinedVariable) else "?"
        raise MissingVariable(
            name, f"template variable {name!r} has no value and no | default(...)"
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(
            f"template failed to render: {type(exc).__name__}", reason="render_failed"
        ) from None


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class RenderedMessage:
    text: str
    encoding: Encoding
    segments: int


def compose_message(body: str, footer: str | None, add_footer: bool) -> str:
    """Body, then the footer (e.g. "Reply STOP to opt out") on its own line when asked for."""
    body = body.strip()
    if add_footer and footer and footer.strip():
        return f"{body}\n{footer.strip()}" if body else footer.strip()
    return body


def measure(text: str) -> RenderedMessage:
    encoding, segments, _units = count_segments(text)
    return RenderedMessage(text=text, encoding=encoding, segments=segments)


def render_message(
    template: jinja2.Template,
    variables: Mapping[str, object],
    footer: str | None,
    add_footer: bool,
    max_segments: int,
) -> RenderedMessage:
    """Render, append the footer, count segments (footer included) and enforce the limit.

    Raises ``EmptyMessage`` when the body is blank and ``TooLong`` when segments exceed
    ``max_segments``, besides the errors of ``render``.
    """
    body = render(template, variables)
    if not body:
        raise EmptyMessage()
    message = measure(compose_message(body, footer, add_footer))
    if message.segments > max_segments:
        raise TooLong(message.segments, max_segments, message.encoding)
    return message


def check_static_length(
    source: str, footer: str | None, max_segments: int
) -> RenderedMessage | None:
    """Load-time check: does the template's fixed text alone (footer included) exceed the limit?

    Every variable is rendered as an empty string, so the result is what any send costs at
    least (for templates without branches on the variables). Raises ``TooLong`` when over the
    limit, ``TemplateError`` for syntax errors and for sandbox violations (reason ``unsafe``:
    such a template would fail on every send). Returns ``None`` when the template cannot be
    rendered with empty strings (e.g. it does arithmetic on a variable): the length is then only
    checked per send.
    """
    if max_segments < 1:
        raise TemplateError(f"max_segments must be at least 1, got {max_segments}", "invalid")
    names = template_variables(source)
    try:
        text = _STATIC_ENV.from_string(source).render({name: "" for name in names}).strip()
    except SecurityError as exc:  # it would fail on every send: refuse it when the file loads
        raise TemplateError(f"template blocked by sandbox: {exc}", reason="unsafe") from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError):
        return None
    message = measure(compose_message(text, footer, footer is not None))
    if message.segments > max_segments:
        raise TooLong(message.segments, max_segments, message.encoding)
    return message
