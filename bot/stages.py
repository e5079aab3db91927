"""The merge and evaluate stages called with what a user names: Hub ids and prompt sources.

merge/ and evaluate/ take local directories and loaded prompt sets only; here Hub ids become
local snapshots (bot/hub.py) and prompt sources loaded sets (bot/prompt_sets.py) before the
stage is called. The command line and the pipeline call these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bot import hub
from bot.config import EvaluateSettings, Settings

if TYPE_CHECKING:
    from bot.evaluate.sweep import Evaluator, SweepReport
    from bot.merge.engine import MergeRequest, MergeResult

StepProgress = Callable[[int, int, str], None]  # (step, steps, what)


def merge_refs(req: MergeRequest, progress: Callable[[int, int], None] | None = None,
               quiet: bool = False) -> MergeResult:
    """`merge` with base and fine-tune given as directories or Hub ids[@revision]: the request
    is checked first (no download for a request that would fail), then the models resolved."""
    from bot.merge.engine import merge_models, validate

    validate(req)
    local = replace(req, base=hub.resolve_model(str(req.base), req.allow_pickle, quiet),
                    finetune=hub.resolve_model(str(req.finetune), req.allow_pickle, quiet))
    return merge_models(local, progress=progress, quiet=quiet)


def sweep_refs(base_ref: str, finetune_ref: str, settings: Settings,
               progress: StepProgress | None = None) -> SweepReport:
    """`sweep` with base and fine-tune given as directories or Hub ids[@revision]; the report
    names them as given."""
    hub.configure(settings.hub)
    base_dir = hub.resolve_model(base_ref, quiet=True)
    finetune_dir = hub.resolve_model(finetune_ref, quiet=True)
    return sweep_dirs(base_dir, finetune_dir, settings, progress, (base_ref, finetune_ref))


def sweep_dirs(base_dir: Path, finetune_dir: Path, settings: Settings,
               progress: StepProgress | None, names: tuple[str, str]) -> SweepReport:
    """The sweep of two local models: the prompt sets (and guard) loaded, then evaluated
    offline (everything it reads is local by then)."""
    from bot.evaluate.sweep import run_sweep
    from bot.prompt_sets import load_inputs

    inputs = load_inputs(settings.evaluate)
    with hub.offline():
        return run_sweep(base_dir, finetune_dir, settings, inputs, progress, names=names)


def evaluator_for(settings: EvaluateSettings, device: str = "cpu") -> Evaluator:
    """An Evaluator (bot/evaluate/sweep.py) over the sets and the guard `settings` name."""
    from bot.evaluate.sweep import Evaluator
    from bot.prompt_sets import load_inputs

    return Evaluator(settings, load_inputs(settings), device)
