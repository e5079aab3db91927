"""Model cards, the README section and the pull request text, from a real sweep of the zoo.

The hostile tests feed Markdown, HTML, Jinja, shell and YAML syntax through every field that
comes from outside (repo ids, revisions, license, prompt-set names, category names, the owner's
README) and check that the output is still the card the bot meant to write.
"""

from __future__ import annotations

import html
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

import bot
from bot.evaluate.sweep import Selection
from bot.publish.card import (
    METADATA_KEYS,
    SECTION_END,
    SECTION_START,
    TAGS,
    card_section,
    merge_card,
    model_card,
    pull_request_text,
)
from bot.publish.markdown import md, shell_arg

from conftest import sweet_spot

CLEAN = {"base_repo": "zoo/zoo-base-it", "base_revision": "a" * 40,
         "finetune_repo": "alice/zoo-ft_flip", "finetune_revision": "b" * 40,
         "bot_version": "0.1.0"}
JINJA = "{{ 7*7 }}{% raw %}{{ 123*456 }}{% endraw %}{{ 123*456 }}"  # 49, 56088
HOSTILE = {
    "base_repo": "org/base<script>alert(1)</script>\n---\nlicense: evil\n",
    "base_revision": "main\u2028---\u2029: # 'q\" `x` $(touch PWNED)",
    "finetune_repo": f"eve/ft{JINJA}](javascript:alert(1))<img src=x onerror=alert(1)>",
    "finetune_revision": "r\r\n---\r\nlicense: evil\x85--- | a | b |\n# heading\n- item",
    "bot_version": "1.0 <script>x</script> @everyone",
}
HOSTILE_LICENSE = "mit\n---\nlicense: evil"
FRONT_MATTER = re.compile(r"---\n(.*?)\n---\n", re.S)


@pytest.fixture(scope="module")
def report(zoo):
    """A real one-point sweep of zoo-ft-flip at its sweet spot (a few seconds)."""
    from bot.config import load_settings
    from bot.stages import sweep_refs as run_sweep

    zoo_dir, built = zoo
    settings = load_settings("bot/zoo/evaluate.toml", [
        f"evaluate.task_file={zoo_dir}/prompts/flip_heldout.jsonl",
        f"sweep.grid=[{sweet_spot(built, 'zoo-ft-flip')}]"])
    report = run_sweep(str(zoo_dir / "zoo-base-it"), str(zoo_dir / "zoo-ft-flip"), settings)
    assert report.selection.publish, report.selection.reason
    return report


@pytest.fixture(scope="module")
def hostile_report(report):
    """The report with hostile text wherever a report carries text from outside."""
    settings = dict(report.settings)
    settings["evaluate"] = {**settings["evaluate"],
                            "harmful": f"hf:evil/set\n---\nx: y <script>{JINJA}",
                            "system_prompt": f"{JINJA}<img src=x onerror=alert(1)>\u2028# h"}
    category = f"<script>c</script>|{JINJA}\n|x|"
    point = replace(report.base_point,
                    asr_by_category={**report.base_point.asr_by_category, category: 0.5})
    return replace(report, task=f"exact match on {JINJA}<script>\n---\n",
                   judge=f"keyword{JINJA}", base_point=point, settings=settings,
                   selection=replace(report.selection,
                                     reason=f"<script>{JINJA}</script>](javascript:x)"))


@pytest.fixture(scope="module")
def tame_report(report):
    """The hostile report's twin with harmless text of the same shape, to compare with."""
    point = replace(report.base_point,
                    asr_by_category={**report.base_point.asr_by_category, "other": 0.5})
    return replace(report, base_point=point)


def pct(x: float) -> str:
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + "%"


def front_matter(card: str) -> dict:
    match = FRONT_MATTER.match(card)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def table_rows(text: str) -> list[list[str]]:
    """Rows of the sweep table (the one whose header starts with λ), header excluded."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| λ"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def code_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    match = re.search(r"```bash\n(.*?)\n```", text[start:], re.S)
    assert match
    return match.group(1)


def bash_words(command: str, program: str) -> list[str]:
    """The words bash makes of `command` with `program` replaced by printf."""
    script = command.replace(program, "printf '%s\\0'", 1)
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout
    return out.decode("utf-8", "surrogateescape").split("\0")[:-1]


# --- the card from a real sweep ------------------------------------------------------------


def test_metadata_is_what_the_hub_reads(report):
    card = model_card(report, license_id="apache-2.0", **CLEAN)
    data = ModelCard(card).data
    assert list(front_matter(card)) == [k for k in METADATA_KEYS
                                        if k not in ("license_name", "license_link")]
    named = ModelCard(model_card(report, license_id="qwen", license_files=["LICENSE"],
                                 **CLEAN)).data
    assert (named.license, named.license_name, named.license_link) == ("other", "qwen", "LICENSE")
    assert data.base_model == [CLEAN["base_repo"], CLEAN["finetune_repo"]]
    assert data.base_model_relation == "merge"
    assert data.license == "apache-2.0"
    assert data.tags == TAGS
    point = next(p for p in report.points if p.weight == report.selection.weight)
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {"attack_success_rate": point.asr, "over_refusal": point.over_refusal,
                      "task_score": point.task}
    assert data.model_name == "zoo-ft_flip-safeguarded"
    assert model_card(report, license_id=None, **CLEAN).count("license: other") == 1


def test_table_has_every_point_and_marks_the_selected_lambda(report):
    for text in (model_card(report, license_id="mit", **CLEAN), card_section(report, **CLEAN)):
        rows = table_rows(text)
        assert len(rows) == len(report.points) + 2
        assert [r[1] for r in (rows[0], rows[-1])] == ["base", "fine-tune"]
        weights = [float(r[0].strip("*")) for r in rows]
        assert weights == [0.0, *(p.weight for p in report.points), 1.0]
        selected = [r for r in rows if "selected" in r[1]]
        assert len(selected) == 1
        assert float(selected[0][0].strip("*")) == report.selection.weight


def test_card_body_has_the_plot_settings_limits_provenance_and_citation(report):
    card = model_card(report, license_id="mit", **CLEAN)
    body = ModelCard(card).text
    assert "![sweep](sweep.png)" in body
    assert "![sweep](plots/sweep.png)" in model_card(report, license_id="mit",
                                                     plot_file="plots/sweep.png", **CLEAN)
    assert "arXiv:2412.19512" in body and "@inproceedings{farn2025safeguard" in body
    for heading in ("## Results", "## Evaluation", "### Limits of this evaluation",
                    "## Provenance", "## How to reproduce", "## Citation"):
        assert heading in body
    assert f"builtin:zoo-harmful ({len(report.base_point.generations['harmful'])} prompts)" in body
    assert "at most 12 new tokens" in body and "keyword judge" in body
    assert CLEAN["base_revision"] in body and CLEAN["finetune_revision"] in body
    assert "safeguard-bot 0.1.0" in body
    with pytest.raises(ValueError, match="plot_file"):
        model_card(report, license_id="mit", plot_file="x)![a](javascript:1", **CLEAN)


def test_reproduce_commands_pin_both_revisions_and_the_weight(report):
    card = model_card(report, license_id="mit", **CLEAN)
    merge = code_block_after(card, "## How to reproduce")
    words = bash_words(merge, "safeguard-bot")
    assert words == ["merge", f"{CLEAN['base_repo']}@{CLEAN['base_revision']}",
                     f"{CLEAN['finetune_repo']}@{CLEAN['finetune_revision']}", "merged",
                     "--method", "linear", "--weight", str(report.selection.weight)]
    sweep = code_block_after(card, "The sweep that chose")
    words = bash_words(sweep, "safeguard-bot")
    assert words[words.index("--grid") + 1] == ",".join(str(p.weight) for p in report.points)
    assert "evaluate.harmful=builtin:zoo-harmful" in words
    assert words[1:3] == [f"{CLEAN['base_repo']}@{CLEAN['base_revision']}",
                          f"{CLEAN['finetune_repo']}@{CLEAN['finetune_revision']}"]
    dare = model_card(replace(report, method="dare_ties"), license_id="mit", **CLEAN)
    words = bash_words(code_block_after(dare, "## How to reproduce"), "safeguard-bot")
    assert words[-6:] == ["--weight", str(report.selection.weight), "--density", "0.5",
                          "--seed", "0"]


def test_a_report_that_publishes_nothing_gets_no_card(report):
    nothing = replace(report, selection=Selection(False, "not safer", None))
    with pytest.raises(ValueError, match="not safer"):
        model_card(nothing, license_id="mit", **CLEAN)


def test_pull_request_text(report):
    title, text = pull_request_text(report, **CLEAN)
    point = next(p for p in report.points if p.weight == report.selection.weight)
    assert "\n" not in title
    assert title == ("Restore safety by merging with the base model (attack success rate "
                     f"{pct(report.finetune_point.asr)} → {pct(point.asr)})")
    assert (f"| attack success rate (lower is safer) | {pct(report.base_point.asr)} | "
            f"{pct(report.finetune_point.asr)} | **{pct(point.asr)}** |") in text
    assert f"| task gain kept (retention) | 0% | 100% | **{pct(point.retention)}** |" in text
    assert "task gain kept (retention)" in text and "over-refusal" in text
    assert "remove the `safeguard` tag" in text
    assert f"`{SECTION_START}`" in text and "Only the weight files" in text
    words = bash_words(code_block_after(text, "### How to reproduce"), "safeguard-bot")
    assert f"{CLEAN['finetune_repo']}@{CLEAN['finetune_revision']}" in words
    assert words[-1] == str(report.selection.weight)
    assert "`ok-to-merge`" in pull_request_text(report, opt_in_tag="ok-to-merge", **CLEAN)[1]


# --- hostile input -------------------------------------------------------------------------


def assert_inert(text: str, clean: str) -> None:
    """Nothing in `text` was evaluated, and nothing from outside became markup."""
    lowered = text.lower()
    assert "<script" not in lowered and "<img" not in lowered
    assert "](javascript" not in lowered
    assert "{{" not in text and "{%" not in text
    assert "56088" not in text and text.count("49") == clean.count("49")
    for char in "\r\x85\u2028\u2029":
        assert char not in text


def assert_same_shape(body: str, clean: str) -> None:
    """The hostile text added no thematic breaks, headings, list items or table rows."""
    assert not any(line.strip() == "---" for line in body.splitlines())
    for prefix in ("#", "- ", "|", "<!--"):
        assert (sum(line.startswith(prefix) for line in body.splitlines())
                == sum(line.startswith(prefix) for line in clean.splitlines())), prefix


def test_hostile_card(hostile_report, tame_report, tmp_path):
    card = model_card(hostile_report, license_id=HOSTILE_LICENSE, **HOSTILE)
    meta = front_matter(card)
    plain = [k for k in METADATA_KEYS if k not in ("license_name", "license_link")]
    assert list(meta) == plain
    assert meta["base_model"] == [HOSTILE["base_repo"], HOSTILE["finetune_repo"]]
    assert meta["license"] == "other" and meta["tags"] == TAGS
    data = ModelCard(card).data
    assert sorted(data.to_dict()) == sorted(plain)
    assert data.base_model == meta["base_model"] and data.license == "other"
    assert {r.metric_type for r in data.eval_results} == {
        "attack_success_rate", "over_refusal", "task_score"}
    assert data.model_name == HOSTILE["finetune_repo"].split("/")[-1] + "-safeguarded"
    body = ModelCard(card).text
    assert card.endswith(body) and body.startswith("\n# ")
    tame = model_card(tame_report, license_id="mit", **CLEAN)
    assert_inert(card, tame)  # the front matter too: it holds escapes, not markup
    assert_same_shape(body, ModelCard(tame).text)
    assert not any(line.startswith(("license:", "x:")) for line in body.splitlines())

    # the reproduce command gives back the hostile names exactly, and runs nothing
    pwned = tmp_path / "PWNED"
    merge = code_block_after(card, "## How to reproduce").replace("PWNED", str(pwned))
    words = bash_words(merge, "safeguard-bot")
    assert words[1:3] == [
        f"{HOSTILE['base_repo']}@{HOSTILE['base_revision']}".replace("PWNED", str(pwned)),
        f"{HOSTILE['finetune_repo']}@{HOSTILE['finetune_revision']}"]
    assert not pwned.exists()
    sweep = code_block_after(card, "The sweep that chose")
    assert f"evaluate.harmful={hostile_report.settings['evaluate']['harmful']}" in bash_words(
        sweep, "safeguard-bot")


def test_hostile_section_and_pull_request(hostile_report, tame_report):
    section = card_section(hostile_report, **HOSTILE)
    tame = card_section(tame_report, **CLEAN)
    assert_inert(section, tame)
    assert_same_shape(section, tame)
    assert section.count(SECTION_START) == 1 and section.count(SECTION_END) == 1
    title, text = pull_request_text(hostile_report, opt_in_tag="<b>{{ 7*7 }}</b>", **HOSTILE)
    clean_title, clean_text = pull_request_text(tame_report, **CLEAN)
    assert title == clean_title
    assert_inert(text, clean_text)
    assert_same_shape(text, clean_text)


def test_hostile_text_renders_as_itself(hostile_report, tame_report):
    """Through a CommonMark renderer that passes raw HTML: the same structure as a tame card,
    no tag or link from the input, and the hostile name shown as text."""
    renderer = MarkdownIt("commonmark", {"html": True}).enable("table")
    texts = [
        (ModelCard(model_card(hostile_report, license_id=HOSTILE_LICENSE, **HOSTILE)).text,
         ModelCard(model_card(tame_report, license_id="mit", **CLEAN)).text),
        (card_section(hostile_report, **HOSTILE), card_section(tame_report, **CLEAN)),
        (pull_request_text(hostile_report, **HOSTILE)[1],
         pull_request_text(tame_report, **CLEAN)[1]),
    ]
    for hostile, tame in texts:
        out, tame_out = renderer.render(hostile), renderer.render(tame)
        assert "<script" not in out
        assert re.findall(r"<(\w+)", out).count("img") == tame_out.count("<img")
        assert all(h.startswith("https://") for h in re.findall(r'href="([^"]*)"', out))
        for tag in ("h1", "h2", "h3", "table", "tr", "li", "pre"):
            assert out.count(f"<{tag}>") == tame_out.count(f"<{tag}>"), tag
    card_html = renderer.render(texts[0][0])
    title = html.unescape(re.search(r"<h1>(.*?)</h1>", card_html).group(1))
    assert title == HOSTILE["finetune_repo"].split("/")[-1] + "-safeguarded"


# --- the owner's README --------------------------------------------------------------------

OWNER_README = (
    "---\nlicense: apache-2.0\ntags:\n- safeguard\n- \"{{ 7*7 }}\"\nbase_model: org/base\n---\n\n"
    "# My model\n\nText with {{ 7*7 }}, {% raw %}, <script>alert(1)</script> and "
    "[a link](javascript:alert(1)).\n\n<!-- an owner's comment -->\n"
    f"An orphan marker that the bot never closed:\n{SECTION_START}\n\nTrailing text, no newline"
)


@pytest.mark.parametrize("readme", [
    OWNER_README, OWNER_README + "\n", OWNER_README.replace("\n", "\r\n"), "",
    "just one line", "---\nlicense: mit\n---\n",
])
def test_merge_card_appends_then_replaces(report, readme):
    first = card_section(report, **CLEAN)
    second = card_section(report, **{**CLEAN, "finetune_revision": "c" * 40})
    merged = merge_card(readme, first)
    assert merged.startswith(readme)  # the owner's text, byte for byte
    assert merged.count(SECTION_START) == readme.count(SECTION_START) + 1
    again = merge_card(merged, second)
    assert again.startswith(readme)
    assert again.count(SECTION_START) == merged.count(SECTION_START)
    assert "c" * 40 in again and "b" * 40 not in again
    assert again == merge_card(readme, second)  # as if the first had never been
    assert merge_card(again, second) == again
    if readme.startswith("---"):
        newline = "\r\n" if "\r\n" in readme else "\n"
        assert front_matter(again.replace(newline, "\n")) == front_matter(
            readme.replace(newline, "\n"))
        assert ModelCard(again).data.to_dict() == ModelCard(readme).data.to_dict()
    if "\r\n" in readme:
        assert "\n" not in again.replace("\r\n", "")


def test_merge_card_replaces_a_section_in_the_middle(report):
    head, tail = "# Model\n\nIntro.\n\n", "\n\n## After the bot's section\n\nOwner text.\n"
    old = f"{SECTION_START}\nold results\n{SECTION_END}"
    new = card_section(report, **CLEAN)
    merged = merge_card(head + old + tail, new)
    assert merged == head + new.strip("\n") + tail
    with pytest.raises(ValueError, match="markers"):
        merge_card(head, "no markers")


def test_hostile_section_cannot_fake_its_end(hostile_report, report):
    """Escaped text never contains the end marker, so the next merge finds the real end."""
    hostile = replace(hostile_report, selection=replace(
        hostile_report.selection, reason=f"x\n{SECTION_END}\n# injected\n{SECTION_START}"))
    merged = merge_card(OWNER_README, card_section(hostile, **HOSTILE))
    assert merged.count(SECTION_END) == 1
    again = merge_card(merged, card_section(report, **CLEAN))
    assert again == merge_card(OWNER_README, card_section(report, **CLEAN))


# --- the escapers --------------------------------------------------------------------------


def test_md_escapes_markdown_html_and_line_breaks():
    assert md("org/my_model-1.0") == "org/my\\_model-1.0"
    assert md("[x](javascript:alert(1))") == "\\[x\\]\\(javascript:alert\\(1\\)\\)"
    assert md("<script>&amp;") == "&lt;script&gt;&amp;amp;"
    assert md("{{ 7*7 }} {% raw %}") == "&#123;&#123; 7\\*7 &#125;&#125; &#123;% raw %&#125;"
    assert md("a\nb\r\nc\u2028d\u2029e\x85f") == "a b c d e f"
    assert md("a|b `c` @d $e$ #f !g ~h ^i") == "a\\|b \\`c\\` \\@d \\$e\\$ \\#f \\!g \\~h \\^i"
    assert md("x\u202eevil\u200b\x00\ud800") == "xevil\ufffd"
    assert md(md("<")) == "&lt;"  # Markup is not escaped twice


@pytest.mark.parametrize("value", [
    "org/name@0123abc", "with space", "quote's", 'dq"', "back`tick`", "<script>", "$(id)",
    "a\nb\r\nc", "\u2028\x85", "ünï©ødé 🙂", "\\x41", "-rf", "", "tab\there", "; rm -rf /",
    "{{ 7*7 }}](javascript:x)!", '["a, b", null]',
])
def test_shell_arg_reads_back_exactly_in_bash(value):
    quoted = shell_arg(value)
    assert all(" " <= c <= "~" for c in quoted)
    assert not any(c in quoted for c in "`<>{}[]()!")
    assert bash_words(f"safeguard-bot {quoted}", "safeguard-bot") == [value]


ROOT = Path(bot.__file__).resolve().parent.parent
INSTALLED_CARD = """
import pickle, sys
import bot
from bot.publish.card import model_card
assert bot.__file__.startswith(sys.argv[1]), bot.__file__  # the wheel's, not the checkout's
sys.stdout.write(model_card(pickle.load(open("report.pkl", "rb")), license_id="mit",
                            **eval(sys.argv[2])))
"""


def test_templates_live_at_the_top_and_the_checkout_finds_them():
    from bot.publish.templates import default_dir

    for name in ("model_card.md.j2", "pull_request.md.j2", "card_section.md.j2",
                 "_results.md.j2", "leaderboard.html.j2"):
        assert (ROOT / "templates" / name).is_file()
    assert not (ROOT / "bot" / "templates").exists()  # built into the wheel, not kept twice
    assert default_dir() == ROOT / "templates"


def test_an_installed_wheel_carries_the_templates_and_renders_a_card(report, tmp_path):
    """Build the wheel from the sources the image copies, install it apart from the checkout,
    and render the same card from it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("bot", "templates"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=120)
    wheel = next((tmp_path / "dist").glob("safeguard_bot-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, timeout=120)
    assert (site / "bot" / "templates" / "model_card.md.j2").is_file()
    (tmp_path / "report.pkl").write_bytes(pickle.dumps(report))
    proc = subprocess.run([sys.executable, "-c", INSTALLED_CARD, str(site), repr(CLEAN)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == model_card(report, license_id="mit", **CLEAN)


def test_an_operators_templates_come_first_and_the_defaults_fill_in(report, tmp_path):
    from bot.config import load_settings

    own = tmp_path / "own"
    own.mkdir()
    (own / "model_card.md.j2").write_text(
        "{% import '_results.md.j2' as results %}\nOur merge of {{ finetune_repo }}.\n"
        "{{ results.sweep_table(rows) }}")
    settings = load_settings(None, [f"publish.templates_dir={own}"])
    assert settings.publish.templates_dir == str(own)
    card = model_card(report, license_id="mit", **HOSTILE, templates_dir=str(own))
    body = FRONT_MATTER.sub("", card, count=1)
    assert body.startswith("Our merge of eve/ft") and "<img" not in body  # escaped as ever
    assert table_rows(body)  # the default macros, from the bot's folder
    assert card_section(report, **CLEAN, templates_dir=str(own)) == card_section(report, **CLEAN)


def test_the_front_matter_never_holds_an_anchor_or_alias():
    """One object in two places is written twice: a Hub may refuse YAML aliases in a card."""
    from bot.publish.card import _yaml

    shared = ["org/base", "org/fine-tune"]
    text = _yaml({"base_model": shared, "datasets": shared})
    assert "&" not in text and "*" not in text
    assert yaml.safe_load(text) == {"base_model": shared, "datasets": shared}
