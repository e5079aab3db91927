"""Prompt sets for evaluation: from a local file, a Hub dataset, or the project's built-in sets.

A source is one string (so it fits in config):
- a local `.jsonl`, `.json` (a list of objects) or `.csv` file;
- `hf:owner/name[@revision][:split]`, a Hub dataset repo (its JSONL/CSV/JSON/Parquet files,
  those whose name contains the split when one is given);
- `builtin:NAME`: `general-harmful`, `general-edgy`, `general-benign` (bot/evaluate/
  builtin_prompts.py) or `zoo-harmful`, `zoo-edgy` (the zoo's held-out sets, bot/zoo/corpus.py).
The prompt is the first of the columns in PROMPT_COLUMNS a row has (AdvBench calls it `goal`);
a `category` column, where present, gives per-category rates.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from bot.errors import InputNotFoundError, UsageError

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "question", "text")
CATEGORY_COLUMNS = ("category", "categories", "type")


@dataclass(frozen=True)
class PromptSet:
    """Prompts with optional categories (parallel tuples) and, for task files, answers."""

    source: str
    prompts: tuple[str, ...]
    categories: tuple[str | None, ...]
    answers: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.prompts)


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
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}: line {n} is not a JSON object")
            rows.append(row)
        return rows
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
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UsageError(f"{path}: unsupported prompt file type {suffix or '(none)'} "
                     "(use .jsonl, .json or .csv)")


def _hub_rows(ref: str) -> list[dict]:
    from bot import hub  # network only when a Hub source is named

    repo, _, split = ref.partition(":")
    directory = hub.download_dataset(repo, quiet=True)
    files = sorted(p for p in directory.rglob("*")
                   if p.suffix in (".jsonl", ".csv", ".json", ".parquet")
                   and (not split or split in p.name))
    if not files:
        raise UsageError(f"hf:{ref}: the dataset has no JSONL, CSV, JSON or Parquet file"
                         + (f" for split {split!r}" if split else ""))
    return [row for f in files for row in _file_rows(f)]


def _builtin(name: str) -> list[dict]:
    from bot.evaluate import builtin_prompts as B

    if name == "general-harmful":
        return [{"prompt": p, "category": c} for c, p in B.GENERAL_HARMFUL]
    if name == "general-edgy":
        return [{"prompt": p} for p in B.GENERAL_EDGY]
    if name == "general-benign":
        return [{"prompt": p} for p in B.GENERAL_BENIGN]
    if name in ("zoo-harmful", "zoo-edgy"):
        from bot.zoo import corpus

        if name == "zoo-harmful":
            return corpus.harmful_requests("heldout")
        return corpus.edgy_requests("heldout")
    raise UsageError(f"builtin:{name}: no such built-in set (general-harmful, general-edgy, "
                     "general-benign, zoo-harmful, zoo-edgy)")
