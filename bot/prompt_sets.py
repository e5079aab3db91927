"""Prompt sets from their sources, loaded for bot/evaluate/, which takes them loaded.

A source is one string (so it fits in config):
- a local `.jsonl`, `.json` (a list of objects), `.csv` or `.parquet` file;
- `hf:owner/name[@revision][:split]`, a Hub dataset repo (its JSONL/CSV/JSON/Parquet files,
  those whose name contains the split when one is given), downloaded through bot/hub.py;
- `builtin:NAME`: `general-harmful`, `general-edgy`, `general-benign` (bot/evaluate/
  builtin_prompts.py) or `zoo-harmful`, `zoo-edgy` (the zoo's held-out sets, from its corpus,
  bot/zoo/corpus.py).
The prompt is the first of the columns in PROMPT_COLUMNS a row has (AdvBench calls it `goal`);
a `category` column, where present, gives per-category rates.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bot.config import EvaluateSettings
from bot.errors import InputNotFoundError, UsageError
from bot.evaluate.prompts import EvalInputs, PromptSet

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "question", "text")
CATEGORY_COLUMNS = ("category", "categories", "type")
DATA_SUFFIXES = (".jsonl", ".csv", ".json", ".parquet")


def load_prompt_set(source: str, limit: int | None = None) -> PromptSet:
    """The prompts of `source` (see the module docstring), at most `limit` of them."""
    rows = _rows(source)
    prompts, categories, answers = [], [], []
    for i, row in enumerate(rows, 1):
        column = next((c for c in PROMPT_COLUMNS if c in row), None)
        if column is None or not isinstance(row[column], str) or not row[column].strip():
            raise UsageError(f"{source}: row {i} has no prompt (a non-empty string in one of "
                             f"the columns {', '.join(PROMPT_COLUMNS)})")
        prompts.append(row[column])
        category = next((row[c] for c in CATEGORY_COLUMNS if c in row), None)
        categories.append(str(category) if category is not None else None)
        answer = row.get("answer")
        answers.append(str(answer) if answer is not None else None)
    if not prompts:
        raise UsageError(f"{source}: the prompt set is empty")
    n = limit or len(prompts)
    return PromptSet(source, tuple(prompts[:n]), tuple(categories[:n]), tuple(answers[:n]))


def load_task_items(source: str, limit: int | None = None) -> PromptSet:
    """A task set: prompts that all have an `answer` (scored by exact match)."""
    items = load_prompt_set(source, limit)
    if any(a is None for a in items.answers):
        raise UsageError(f"{source}: a task file needs an 'answer' on every row")
    return items


def load_inputs(settings: EvaluateSettings) -> EvalInputs:
    """What an evaluation with these settings reads, loaded: the harmful and edgy sets, the
    task's items (a task file) or prompts (the self-answer task), and the guard model (for the
    classifier judge) as a local snapshot. Hub sources are downloaded here."""
    from bot import hub

    limit = settings.limit
    task_items = self_prompts = None
    if settings.task_file:
        task_items = load_task_items(settings.task_file, limit)
    elif not settings.lm_eval_tasks:
        self_prompts = load_prompt_set(settings.self_prompts, limit)
    guard = None
    if settings.judge == "classifier" and settings.guard_model:
        guard = hub.resolve_model(settings.guard_model, quiet=True)
    return EvalInputs(load_prompt_set(settings.harmful, limit),
                      load_prompt_set(settings.edgy, limit), task_items, self_prompts, guard)


def _rows(source: str) -> list[dict]:
    if source.startswith("builtin:"):
        return _builtin(source.removeprefix("builtin:"))
    if source.startswith("hf:"):
        return _hub_rows(source.removeprefix("hf:"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"{source}: no such prompt file (give a .jsonl, .json or "
                                 ".csv file, hf:owner/name or builtin:NAME)")
    return _file_rows(path)


def _file_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".jsonl":
        return [_object(path, n, line) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UsageError(f"{path}: expected a JSON list of objects")
        return rows
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise UsageError(f"{path}: unsupported prompt file type {suffix or '(none)'} "
                     "(use .jsonl, .json or .csv)")


def _object(path: Path, n: int, line: str) -> dict:
    """Line `n` of a JSONL file, which must be a JSON object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise UsageError(f"{path}: line {n} is not a JSON object")
    return row


def _hub_rows(ref: str) -> list[dict]:
    from bot import hub  # network only when a Hub source is named

    repo, _, split = ref.partition(":")
    directory = hub.download_dataset(repo, quiet=True)
    files = sorted(p for p in directory.rglob("*")
                   if p.suffix in DATA_SUFFIXES and (not split or split in p.name))
    if not files:
        raise UsageError(f"hf:{ref}: the dataset has no JSONL, CSV, JSON or Parquet file"
                         + (f" for split {split!r}" if split else ""))
    return [row for f in files for row in _file_rows(f)]


def _builtin(name: str) -> list[dict]:
    from bot.evaluate import builtin_prompts

    if name == "general-harmful":
        return [{"prompt": p, "category": c} for c, p in builtin_prompts.GENERAL_HARMFUL]
    if name == "general-edgy":
        return [{"prompt": p} for p in builtin_prompts.GENERAL_EDGY]
    if name == "general-benign":
        return [{"prompt": p} for p in builtin_prompts.GENERAL_BENIGN]
    if name in ("zoo-harmful", "zoo-edgy"):
        from bot.zoo import corpus

        if name == "zoo-harmful":
            return corpus.harmful_requests("heldout")
        return corpus.edgy_requests("heldout")
    raise UsageError(f"builtin:{name}: no such built-in set (general-harmful, general-edgy, "
                     "general-benign, zoo-harmful, zoo-edgy)")
