"""What an evaluation reads, loaded: prompt sets and the guard model's local snapshot.

Loading them from their sources (files, Hub datasets, built-in sets) is bot/prompt_sets.py's
business; evaluate/ takes them loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptSet:
    """Prompts with optional categories (parallel tuples) and, for task files, answers."""

    source: str
    prompts: tuple[str, ...]
    categories: tuple[str | None, ...]
    answers: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class EvalInputs:
    """Everything an Evaluator reads besides the models: the harmful and edgy sets, the task's
    items (a task file, exact match) or prompts (the self-answer task), and the guard model's
    directory (judge = classifier)."""

    harmful: PromptSet
    edgy: PromptSet
    task_items: PromptSet | None = None
    self_prompts: PromptSet | None = None
    guard_model: Path | None = None
