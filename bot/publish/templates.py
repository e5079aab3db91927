"""Jinja2 rendering of bot/templates/ (HTML autoescaped; untrusted text is data only)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                              autoescape=jinja2.select_autoescape(["html.j2", "xml.j2"]),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(name: str, **data) -> str:
    return _environment().get_template(name).render(**data)
