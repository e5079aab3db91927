"""Markdown that renders as itself: escaping for the Markdown templates (templates/*.md.j2).

Everything from outside the bot is data, never template source: repo ids, revisions, license
strings, prompt-set names, an owner's README. In the Markdown templates every `{{ }}` value is
Markdown-escaped on output (the environment's `finalize` is `md`, bot/publish/templates.py);
only the bot's own Markdown is `Markup` (`ours`). Shell arguments are quoted into printable
ASCII free of Markdown, HTML and template syntax (`shell_arg`), so no value can leave a command
block.
"""

from __future__ import annotations

import re

from markupsafe import Markup

from bot.hub import is_repo_id

# line breaks (also the Unicode ones) and tabs become one space: a value stays on its line
_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
# control characters, zero-width and bidirectional-override characters are dropped
_HIDDEN = re.compile(
    "[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u2069\ufeff]")
_SURROGATES = re.compile("[\ud800-\udfff]")
# ASCII punctuation that can start Markdown syntax anywhere in a line (links, emphasis, code,
# tables, images, math, mentions), backslash-escaped; HTML specials and braces (template
# syntax: no "{{", "{%" or "{#" survives) become character references
_MD_SPECIAL = re.compile(r"([\\`*_\[\]()#+!|~^$@])")
_ENTITIES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "{": "&#123;",
                           "}": "&#125;"})
_CODE_SAFE = re.compile(r"[A-Za-z0-9_.:/@+=,-]{1,200}")
_SHELL_PLAIN = re.compile(r"[A-Za-z0-9_./@:=+,%-]+")
# characters a quoted bash word may hold as they are: none that is Markdown, HTML, template or
# shell-quoting syntax (those are written as \xHH inside $'...')
_SHELL_LITERAL = re.compile(r"[A-Za-z0-9_./@:=+,%\- \"#;*?&|~]*")


def ours(text: str) -> Markup:
    """Mark text as the bot's own Markdown: only escaped, validated or constant text."""
    return Markup(text)  # noqa: S704 - every caller passes escaped or validated text


def md(value: object) -> Markup:
    """`value` as inline Markdown text that renders as itself: one line, no markup, no HTML."""
    if isinstance(value, Markup):
        return value
    text = _HIDDEN.sub("", _BREAKS.sub(" ", str(value)))
    text = _SURROGATES.sub("\ufffd", text)
    return ours(_MD_SPECIAL.sub(r"\\\1", text).translate(_ENTITIES))


def code(value: object) -> Markup:
    """An inline code span for identifiers (revisions, tags); escaped text if not one."""
    text = str(value)
    return ours(f"`{text}`") if _CODE_SAFE.fullmatch(text) else md(text)


def hub_link(repo_id: object) -> Markup:
    """A link to a Hub repo when `repo_id` is a well-formed id, else the escaped text."""
    text = str(repo_id)
    if is_repo_id(text):
        return ours(f"[{md(text)}](https://huggingface.co/{text})")
    return md(text)


def shell_arg(value: object) -> Markup:
    """One bash word for `value`, in printable ASCII without Markdown, HTML or Jinja syntax.

    Plain when safe, single-quoted when that suffices, else ANSI-C quoted (`$'...'`) with every
    other character as its UTF-8 bytes in `\\xHH` escapes, so bash gives back exactly `value`.
    """
    text = str(value)
    if _SHELL_PLAIN.fullmatch(text):
        return ours(text)
    if _SHELL_LITERAL.fullmatch(text):
        return ours(f"'{text}'")
    out = [c if _SHELL_LITERAL.fullmatch(c) else
           "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogatepass")) for c in text]
    return ours("$'" + "".join(out) + "'")


def tidy(text: str) -> str:
    """At most one blank line in a row (macros end their output with a newline)."""
    return re.sub(r"\n{3,}", "\n\n", text)


def finalize(value: object) -> object:
    """Every string a template prints is Markdown-escaped unless it is the bot's Markup."""
    return md(value) if isinstance(value, str) else value


def num(x: float) -> str:
    """A lambda as Python writes it: the shortest text that reads back as the same float."""
    return repr(float(x))


def _pct(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + "%"


def _points(x: float) -> str:
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + " percentage points"


def _score(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


# the filters the templates use: {{ x|md }}, {{ repo|hub_link }}, {{ weight|num }}, ...
FILTERS = {"md": md, "code": code, "hub_link": hub_link, "shell": shell_arg, "num": num,
           "pct": _pct, "points": _points, "score": _score}
