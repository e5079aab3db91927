"""Model cards and pull request texts for a published merge (templates in templates/).

Everything from outside the bot is data, never template source: repo ids, revisions, license
strings, prompt-set names, an owner's README. The templates print every value Markdown-escaped
and shell arguments quoted (bot/publish/markdown.py). The YAML front matter is
huggingface_hub's `ModelCardData` written by a YAML dumper that double-quotes every string that
is not plain printable ASCII free of markup characters, and writes those characters as escapes:
no value can end the metadata block, add a key, or carry markup.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

import yaml
from huggingface_hub import EvalResult, ModelCardData

from bot.config import OPT_IN_TAG, EvaluateSettings, PolicySettings, SweepSettings
from bot.merge.methods import METHODS
from bot.publish.licenses import RULES
from bot.publish.markdown import num, ours, shell_arg, tidy
from bot.publish.templates import template

if TYPE_CHECKING:
    from bot.evaluate.sweep import SweepPoint, SweepReport

TAGS = ["safeguarded", "merge", "safeguard-bot"]
METADATA_KEYS = ["base_model", "base_model_relation", "license", "license_name", "license_link",
                 "library_name",
                 "pipeline_tag", "tags", "model-index"]
SECTION_START = "<!-- safeguard-bot:start -->"
SECTION_END = "<!-- safeguard-bot:end -->"
MERGE_OUT = "merged"  # the output folder in the reproduce command
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_PLOT_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


# --- YAML ----------------------------------------------------------------------------------


# written as escapes in YAML too: a renderer that shows the front matter as Markdown (or a
# template engine reading it) must not find markup or template syntax in it
_YAML_ESCAPED = frozenset("<>&{}[]`")


class _CardDumper(yaml.SafeDumper):
    """SafeDumper that double-quotes any string other than plain printable ASCII without
    markup characters, and writes everything but plain characters in it as escapes. It never
    writes an anchor or alias (a Hub may refuse a card with one: the local hub does)."""

    def ignore_aliases(self, data) -> bool:
        return True

    def write_double_quoted(self, text: str, split: bool = True) -> None:
        self.write_indicator('"', True)
        out = []
        for ch in text:
            if ch in self.ESCAPE_REPLACEMENTS:
                out.append("\\" + self.ESCAPE_REPLACEMENTS[ch])
            elif " " <= ch <= "~" and ch not in _YAML_ESCAPED:
                out.append(ch)
            else:
                code = ord(ch)
                out.append(f"\\x{code:02X}" if code <= 0xFF else f"\\u{code:04X}"
                           if code <= 0xFFFF else f"\\U{code:08X}")
        data = "".join(out)
        self.column += len(data)
        self.stream.write(data.encode(self.encoding) if self.encoding else data)
        self.write_indicator('"', False)


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    plain = text.isascii() and text.isprintable() and not _YAML_ESCAPED.intersection(text)
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=None if plain else '"')


_CardDumper.add_representer(str, _represent_str)


def _yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_CardDumper, sort_keys=False, allow_unicode=False,
                     default_flow_style=False, width=2**31)


def _license(license_id: str | None) -> tuple[str, str | None]:
    """The license to declare, as (Hub id, license_name): the fine-tune's if the Hub knows it,
    ("other", its name) for a license of the bot's table the Hub lists by name (qwen), else
    ("other", None)."""
    if not isinstance(license_id, str):
        return "other", None
    lowered = license_id.strip().lower()
    if lowered in RULES and not RULES[lowered].hub_id:
        return "other", lowered
    return (lowered if _LICENSE_ID.fullmatch(lowered) else "other"), None


def card_metadata(report: SweepReport, *, base_repo: str, finetune_repo: str,
                  license_id: str | None, model_name: str,
                  license_link: str | None = None) -> ModelCardData:
    """The card's metadata: both parents, a merge, the license, tags and the model-index."""
    point = _selected(report)
    ev = report.settings.get("evaluate", {})
    results = [
        EvalResult(task_type="text-generation", task_name="Safety",
                   dataset_type=str(ev.get("harmful", "harmful prompts")),
                   dataset_name=f"harmful prompts: {ev.get('harmful', 'unknown')}",
                   metric_type="attack_success_rate",
                   metric_name=f"attack success rate, {report.judge} judge, lower is safer",
                   metric_value=point.asr),
        EvalResult(task_type="text-generation", task_name="Over-refusal",
                   dataset_type=str(ev.get("edgy", "benign-but-edgy prompts")),
                   dataset_name=f"benign-but-edgy prompts: {ev.get('edgy', 'unknown')}",
                   metric_type="over_refusal",
                   metric_name="over-refusal, keyword judge, lower is better",
                   metric_value=point.over_refusal),
        EvalResult(task_type="text-generation", task_name="Task",
                   dataset_type=str(ev.get("task_file") or "task"),
                   dataset_name=f"task: {report.task}", metric_type="task_score",
                   metric_name=f"task score, {report.task}", metric_value=point.task),
    ]
    license_id, license_name = _license(license_id)
    named = {"license_name": license_name, "license_link": license_link} if license_name else {}
    return ModelCardData(
        base_model=[base_repo, finetune_repo], base_model_relation="merge",
        license=license_id, **named, library_name="transformers",
        pipeline_tag="text-generation", tags=list(TAGS), model_name=model_name,
        eval_results=results)


# --- the texts -----------------------------------------------------------------------------


def model_card(report: SweepReport, *, base_repo: str, base_revision: str, finetune_repo: str,
               finetune_revision: str, license_id: str | None, plot_file: str = "sweep.png",
               bot_version: str, model_name: str | None = None,
               templates_dir: str | None = None, license_files: list[str] = (),
               stripped: dict[str, list[str]] | None = None) -> str:
    """The README.md of a published merge: Hub metadata, then the body from model_card.md.j2.

    Args:
        report: the sweep; its selection must publish a lambda.
        base_repo, base_revision, finetune_repo, finetune_revision: the parents, as merged.
        license_id: the fine-tune's license id (None or malformed: "other"), or the key of
            bot/publish/licenses.py's table (its notice is shown).
        plot_file: the sweep plot's path in the repo (relative, plain characters).
        bot_version: safeguard-bot's version, for provenance.
        model_name: the model-index name (default: the fine-tune's name + "-safeguarded").
        templates_dir: an operator's templates, before the bot's (setting publish.templates_dir).
        license_files: the license files the repo carries (LICENSE, NOTICE, USE_POLICY.md).
        stripped: keys removed from copied JSON files as remote code ({file: [keys]}).

    Returns:
        The card: YAML front matter and a Markdown body.
    """
    if not _PLOT_FILE.fullmatch(plot_file) or ".." in plot_file.split("/"):
        raise ValueError(f"plot_file must be a plain relative path, not {plot_file!r}")
    model_name = model_name or finetune_repo.rsplit("/", 1)[-1] + "-safeguarded"
    link = next((f for f in license_files if f.startswith("LICENSE")), None)
    data = card_metadata(report, base_repo=base_repo, finetune_repo=finetune_repo,
                         license_id=license_id, model_name=model_name, license_link=link)
    context = _context(report, base_repo=base_repo, base_revision=base_revision,
                       finetune_repo=finetune_repo, finetune_revision=finetune_revision,
                       bot_version=bot_version)
    context.update(model_name=model_name, plot_file=ours(plot_file),
                   license=data.license_name or data.license, declared_license=license_id,
                   license_files=list(license_files),
                   license_notice=RULES[license_id].notice if license_id in RULES else "",
                   stripped=sorted((stripped or {}).items()))
    body = tidy(template("model_card.md.j2", templates_dir).render(context))
    metadata = data.to_dict()
    metadata = {key: metadata.pop(key) for key in METADATA_KEYS if key in metadata} | metadata
    return f"---\n{_yaml(metadata)}---\n{body}"


def card_section(report: SweepReport, *, base_repo: str, base_revision: str,
                 finetune_repo: str, finetune_revision: str, bot_version: str,
                 templates_dir: str | None = None) -> str:
    """The evaluation section for an opted-in owner's README, between the bot's markers."""
    context = _context(report, base_repo=base_repo, base_revision=base_revision,
                       finetune_repo=finetune_repo, finetune_revision=finetune_revision,
                       bot_version=bot_version)
    section = tidy(template("card_section.md.j2", templates_dir).render(context))
    assert section.startswith(SECTION_START) and section.rstrip().endswith(SECTION_END)
    return section


def pull_request_text(report: SweepReport, *, base_repo: str, base_revision: str,
                      finetune_repo: str, finetune_revision: str, bot_version: str,
                      opt_in_tag: str = OPT_IN_TAG,
                      templates_dir: str | None = None) -> tuple[str, str]:
    """(title, description) of the pull request that merges the fine-tune with its base.

    The title holds numbers only (Hub titles are plain text); the description is Markdown.
    """
    context = _context(report, base_repo=base_repo, base_revision=base_revision,
                       finetune_repo=finetune_repo, finetune_revision=finetune_revision,
                       bot_version=bot_version)
    context.update(opt_in_tag=opt_in_tag, section_start=ours(f"`{SECTION_START}`"),
                   section_end=ours(f"`{SECTION_END}`"))
    module = template("pull_request.md.j2", templates_dir).make_module(context)
    title = " ".join(str(module.title).split())
    return title, tidy(str(module)).strip() + "\n"


def merge_card(existing_readme: str, section: str) -> str:
    """The owner's README with the bot's section appended, or an earlier one replaced.

    Everything outside the section is kept byte for byte. The earlier section is the last
    start marker at the start of a line that has an end marker after it; a README using CRLF
    line ends gets the section with CRLF too.
    """
    block = section.strip("\r\n")
    if not (block.startswith(SECTION_START) and block.endswith(SECTION_END)):
        raise ValueError("section must start and end with the safeguard-bot markers")
    newline = "\r\n" if "\r\n" in existing_readme else "\n"
    block = block.replace("\r\n", "\n").replace("\n", newline)
    starts = [m.start() for m in
              re.finditer(r"(?m)^" + re.escape(SECTION_START), existing_readme)]
    for start in reversed(starts):
        end = existing_readme.find(SECTION_END, start + len(SECTION_START))
        if end != -1:
            end += len(SECTION_END)
            return existing_readme[:start] + block + existing_readme[end:]
    if not existing_readme:
        return block + newline
    gap = newline if existing_readme.endswith(("\n", "\r")) else newline * 2
    return existing_readme + gap + block + newline


# --- the data the templates see -------------------------------------------------------------


def _selected(report: SweepReport) -> SweepPoint:
    weight = report.selection.weight
    if not report.selection.publish or weight is None:
        raise ValueError(f"the sweep selected nothing to publish: {report.selection.reason}")
    for point in report.points:
        if math.isclose(point.weight, weight):
            return point
    raise ValueError(f"the selected lambda {weight} is not among the sweep's points")


def _row(point: SweepPoint, label: str, selected: bool = False) -> dict:
    return {"weight": point.weight, "label": label, "asr": point.asr,
            "over_refusal": point.over_refusal, "task": point.task,
            "retention": point.retention, "selected": selected}


def _wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate measured on n prompts."""
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _set_value(value: object) -> str:
    """A setting as `--set` reads it back: the string itself when that is unambiguous."""
    if isinstance(value, str) and "," not in value:
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def _sweep_overrides(settings: dict) -> list[str]:
    """`--set` items for every sweep-relevant setting that differs from the default."""
    items = []
    for section, default in (("evaluate", EvaluateSettings()), ("sweep", SweepSettings()),
                             ("policy", PolicySettings())):
        defaults = default.model_dump()
        for key, value in settings.get(section, {}).items():
            if section == "sweep" and key in ("grid", "method"):
                continue  # --grid and --method
            if key in defaults and value != defaults[key]:
                items.append(f"{section}.{key}={_set_value(value)}")
    return items


def _commands(report: SweepReport, base_ref: str, finetune_ref: str, weight: float) -> dict:
    sweep = report.settings.get("sweep", {})
    merge = ["safeguard-bot", "merge", shell_arg(base_ref), shell_arg(finetune_ref), MERGE_OUT,
             "--method", shell_arg(report.method), "--weight", num(weight)]
    method = METHODS.get(report.method)
    if method and method.uses_density:
        merge += ["--density", num(sweep.get("density", 0.5))]
    if method and method.seeded:
        merge += ["--seed", shell_arg(sweep.get("seed", 0))]
    grid = ",".join(num(p.weight) for p in report.points)
    lines = [f"safeguard-bot sweep {shell_arg(base_ref)} {shell_arg(finetune_ref)} "
             f"--grid {grid} --method {shell_arg(report.method)}"]
    lines += [f"--set {shell_arg(item)}" for item in _sweep_overrides(report.settings)]
    return {"merge_command": ours(" ".join(merge)),
            "sweep_command": ours(" \\\n    ".join(lines))}


def _context(report: SweepReport, *, base_repo: str, base_revision: str, finetune_repo: str,
             finetune_revision: str, bot_version: str) -> dict:
    """Everything the templates print, as data."""
    point = _selected(report)
    ev = dict(report.settings.get("evaluate", {}))
    policy = dict(report.settings.get("policy", {}))
    n_harmful = len(report.base_point.generations.get("harmful", [])) or None
    n_edgy = len(report.base_point.generations.get("edgy", [])) or None
    categories = sorted(set(report.base_point.asr_by_category)
                        | set(report.finetune_point.asr_by_category)
                        | set(point.asr_by_category))
    base_ref, finetune_ref = f"{base_repo}@{base_revision}", f"{finetune_repo}@{finetune_revision}"
    return {
        "base_repo": base_repo, "base_revision": base_revision, "finetune_repo": finetune_repo,
        "finetune_revision": finetune_revision, "bot_version": bot_version,
        "method": report.method, "weight": point.weight, "reason": report.selection.reason,
        "judge": report.judge, "task": report.task,
        "selected": _row(point, "merge", True),
        "base": _row(report.base_point, "base"),
        "finetune": _row(report.finetune_point, "fine-tune"),
        "rows": [_row(report.base_point, "base"),
                 *(_row(p, "merge", p is point) for p in report.points),
                 _row(report.finetune_point, "fine-tune")],
        "categories": [{"name": c, "base": report.base_point.asr_by_category.get(c),
                        "finetune": report.finetune_point.asr_by_category.get(c),
                        "selected": point.asr_by_category.get(c)} for c in categories],
        "ev": ev, "policy": policy, "n_harmful": n_harmful, "n_edgy": n_edgy,
        "interval": _wilson(point.asr, n_harmful) if n_harmful else None,
        "paper_url": ours("https://arxiv.org/abs/2412.19512"),
        **_commands(report, base_ref, finetune_ref, point.weight),
    }
