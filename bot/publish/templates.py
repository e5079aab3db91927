"""The bot's one Jinja environment: model cards, pull request texts and the leaderboard page.

Templates come from the bot's defaults, `templates/` at the top of a checkout (an installed
wheel carries them as bot/templates/, copied there by the build: bot/_build.py), or from an
operator's own folder (the setting `publish.templates_dir`), where every template it lacks
falls back to the default. Values are data, never template source: the Markdown templates
(*.md.j2) Markdown-escape every value they print (bot/publish/markdown.py); all others
HTML-escape it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

from bot.publish.markdown import FILTERS, finalize

PACKAGED = Path(__file__).resolve().parent.parent / "templates"  # bot/templates/ in a wheel
CHECKOUT = Path(__file__).resolve().parent.parent.parent / "templates"  # a checkout's templates/
MARKDOWN = ".md.j2"


def default_dir() -> Path:
    """The bot's own templates: in the package when installed from a wheel, else the checkout's."""
    return PACKAGED if PACKAGED.is_dir() else CHECKOUT


@jinja2.pass_context
def _finalize(context: jinja2.runtime.Context, value: object) -> object:
    """Markdown templates print every string Markdown-escaped; HTML ones leave it to autoescape."""
    return finalize(value) if (context.name or "").endswith(MARKDOWN) else value


@cache
def environment(templates_dir: str | None = None) -> jinja2.Environment:
    """The environment over `templates_dir` (None: the defaults only), then the defaults."""
    loaders = [jinja2.FileSystemLoader(default_dir())]
    if templates_dir:
        loaders.insert(0, jinja2.FileSystemLoader(Path(templates_dir).expanduser()))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders), autoescape=True, finalize=_finalize,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


def template(name: str, templates_dir: str | None = None) -> jinja2.Template:
    """The template called `name`, from the operator's folder if it has one, else the bot's."""
    return environment(templates_dir).get_template(name)


def render(name: str, templates_dir: str | None = None, **data) -> str:
    """The template called `name` rendered with `data`."""
    return template(name, templates_dir).render(**data)
