"""The sweep: evaluate the merge of a base and a fine-tune at every lambda, choose one, explain.

Base and fine-tune are local directories (bot/hub.py resolves Hub ids before) and the prompt
sets come loaded (bot/prompt_sets.py). The models are loaded once; each lambda's merge is written
into the fine-tune model's parameters in place (bot/merge/inplace.py), so no checkpoint is
written and nothing reloaded.
Every point gets ASR (with per-category rates), over-refusal and a task score; the selection
policy (bot/config.py PolicySettings) picks the trade-off and says why in words.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bot.config import EvaluateSettings, PolicySettings, Settings
from bot.evaluate.generation import generate
from bot.evaluate.judges import make_judge
from bot.evaluate.prompts import EvalInputs, PromptSet
from bot.evaluate.safety import is_refusal
from bot.evaluate.task import make_task


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated model: a merge at `weight`, or the base (0) or the fine-tune (1)."""

    weight: float
    asr: float
    over_refusal: float
    task: float
    retention: float | None = None  # (task - base) / (fine-tune - base)
    asr_by_category: dict[str, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    generated_tokens: int = 0
    generations: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        """The point without its raw generations."""
        return {k: v for k, v in asdict(self).items() if k != "generations"}


@dataclass(frozen=True)
class Selection:
    publish: bool
    reason: str
    weight: float | None = None


@dataclass(frozen=True)
class SweepReport:
    base: str
    finetune: str
    method: str
    task: str
    judge: str
    base_point: SweepPoint
    finetune_point: SweepPoint
    points: list[SweepPoint]
    selection: Selection
    timings: dict[str, float]
    settings: dict

    def to_dict(self, generations: bool = False) -> dict:
        def point(p: SweepPoint) -> dict:
            return asdict(p) if generations else p.summary()

        return {"base": self.base, "finetune": self.finetune, "method": self.method,
                "task": self.task, "judge": self.judge,
                "base_point": point(self.base_point), "finetune_point": point(self.finetune_point),
                "points": [point(p) for p in self.points],
                "selection": asdict(self.selection), "timings": self.timings,
                "settings": self.settings}


class Evaluator:
    """Measures one model: safety on the harmful and edgy sets, and the task."""

    def __init__(self, settings: EvaluateSettings, inputs: EvalInputs, device: str = "cpu"):
        self.settings = settings
        self.harmful, self.edgy = inputs.harmful, inputs.edgy
        self.judge = make_judge(settings.judge, inputs.guard_model, settings.guard_format,
                                device)
        self.task = make_task(settings, inputs)

    def _answers(self, model, tok, prompts: PromptSet) -> list[str]:
        s = self.settings
        return generate(model, tok, list(prompts.prompts), s.max_new_tokens, s.system_prompt,
                        s.batch_size, s.repetition_penalty)

    def measure(self, model, tok, weight: float, task_range: tuple[float, float] | None = None,
                merge_seconds: float = 0.0) -> SweepPoint:
        started = time.perf_counter()
        harmful_answers = self._answers(model, tok, self.harmful)
        verdicts = self.judge.harmful(list(self.harmful.prompts), harmful_answers)
        edgy_answers = self._answers(model, tok, self.edgy)
        refused = [is_refusal(a) for a in edgy_answers]
        task = self.task.score(model, tok)
        by_category: dict[str, list[bool]] = {}
        for category, verdict in zip(self.harmful.categories, verdicts, strict=True):
            if category is not None:
                by_category.setdefault(category, []).append(verdict)
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1
                     for a in harmful_answers + edgy_answers)
        return SweepPoint(
            weight=weight,
            asr=_rate(verdicts), over_refusal=_rate(refused), task=round(task, 4),
            retention=retention(task, *task_range) if task_range else None,
            asr_by_category={c: _rate(v) for c, v in sorted(by_category.items())},
            merge_seconds=round(merge_seconds, 4),
            eval_seconds=round(time.perf_counter() - started, 3), generated_tokens=tokens,
            generations={
                "harmful": [{"prompt": p, "answer": a, "harmful": v} for p, a, v in
                            zip(self.harmful.prompts, harmful_answers, verdicts, strict=True)],
                "edgy": [{"prompt": p, "answer": a, "refused": r} for p, a, r in
                         zip(self.edgy.prompts, edgy_answers, refused, strict=True)]})


def _rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def retention(task: float, base: float, finetune: float) -> float:
    """Share of the fine-tune's task gain kept; 1.0 when the fine-tune gained nothing."""
    gain = finetune - base
    if gain <= 1e-9:
        return 1.0
    return round((task - base) / gain, 4)


def select(base: SweepPoint, finetune: SweepPoint, points: list[SweepPoint],
           policy: PolicySettings) -> Selection:
    """Among merges keeping the task and not over-refusing, the lowest ASR (ties: larger
    lambda); worth publishing only if it lowers ASR enough below the fine-tune's."""
    pct = _pct
    if finetune.asr - base.asr < policy.min_asr_drop:
        return Selection(False, f"fine-tune already as safe as its base (ASR {pct(finetune.asr)}"
                                f" vs {pct(base.asr)})")
    keeping = [p for p in points if p.retention is not None
               and p.retention >= policy.min_retention]
    if not keeping:
        best = max(points, key=lambda p: (p.retention or 0, p.weight))
        return Selection(False, f"no merge keeps {pct(policy.min_retention)} of the task gain "
                                f"(best: {pct(best.retention or 0)} at lambda {best.weight})")
    limit = base.over_refusal + policy.max_over_refusal_increase
    eligible = [p for p in keeping if p.over_refusal <= limit + 1e-9]
    if not eligible:
        return Selection(False, f"every merge that keeps {pct(policy.min_retention)} of the task "
                                f"gain over-refuses (above {pct(limit)} of benign-but-edgy "
                                "prompts)")
    best = min(eligible, key=lambda p: (p.asr, -p.weight))
    drop = finetune.asr - best.asr
    if drop < policy.min_asr_drop:
        return Selection(False, f"the best merge (lambda {best.weight}) lowers ASR by only "
                                f"{pct(drop)} (needs {pct(policy.min_asr_drop)})", best.weight)
    return Selection(True, f"lambda {best.weight} lowers ASR from {pct(finetune.asr)} to "
                           f"{pct(best.asr)} (base {pct(base.asr)}), keeps "
                           f"{pct(best.retention or 0)} of the task gain, over-refusal "
                           f"{pct(best.over_refusal)} (base {pct(base.over_refusal)})",
                     best.weight)


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


def load_pair(base_dir: str | Path, finetune_dir: str | Path, device: str = "cpu",
              dtype: str | None = None):
    """(base, fine-tune, base tokenizer, fine-tune tokenizer) from their local directories:
    safetensors only, no remote code.

    A LoRA adapter fine-tune is merged into a copy of the base with PEFT. The fine-tune's
    tokenizer is its own when it has one (it may have grown the vocabulary), else the base's.
    """
    from transformers import AutoModelForCausalLM

    from bot.merge.engine import check_configs, read_config

    base_dir, ft_dir = Path(base_dir), Path(finetune_dir)
    kwargs = {"dtype": getattr(torch, dtype) if dtype else "auto", "use_safetensors": True}
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).to(device).eval()
    if (ft_dir / "adapter_config.json").exists():
        from peft import PeftModel

        copy = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).to(device)
        ft = PeftModel.from_pretrained(copy, ft_dir).merge_and_unload().eval()
    else:
        check_configs(read_config(base_dir), read_config(ft_dir))
        ft = AutoModelForCausalLM.from_pretrained(ft_dir, **kwargs).to(device).eval()
    ft_tok_dir = ft_dir if (ft_dir / "tokenizer_config.json").exists() else base_dir
    return base, ft, safe_tokenizer(base_dir), safe_tokenizer(ft_tok_dir)


def safe_tokenizer(directory: Path):
    """The tokenizer of `directory`, loaded from a copy of its allow-listed files with every
    remote-code hook (auto_map, a *_class naming a module) removed: a stranger's tokenizer
    code is never run, and its plain tokenizer still loads."""
    import tempfile

    from transformers import AutoTokenizer

    from bot.merge.engine import copy_aux_files

    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        copy_aux_files([directory], Path(tmp), None)
        return AutoTokenizer.from_pretrained(tmp)


def run_sweep(base_dir: str | Path, finetune_dir: str | Path, settings: Settings,
              inputs: EvalInputs, progress: Callable[[int, int, str], None] | None = None, *,
              names: tuple[str, str] | None = None) -> SweepReport:
    """Evaluate base, fine-tune and every lambda of the grid; select; return the report.

    Args:
        base_dir, finetune_dir: the models' local directories.
        settings: the grid, method, evaluation and selection policy.
        inputs: the prompt sets (and guard) `settings.evaluate` names, loaded.
        progress: called (step, steps, what) as the sweep goes.
        names: how the report names base and fine-tune (default: the directories), e.g. the
            Hub ids they were downloaded from.
    """
    from bot.merge.inplace import InPlaceMerger

    s, started = settings.sweep, time.perf_counter()
    steps = len(s.grid) + 2
    say = progress or (lambda i, n, what: None)
    say(0, steps, "loading models")
    evaluator = Evaluator(settings.evaluate, inputs, s.device)
    base, ft, base_tok, tok = load_pair(base_dir, finetune_dir, s.device, s.dtype)
    merger = InPlaceMerger(ft, base.state_dict(), s.method, s.density, s.seed)
    evaluator.task.prepare(ft, tok)
    loaded = time.perf_counter()

    say(0, steps, "evaluating the base")
    base_point = evaluator.measure(base, base_tok, 0.0)
    del base  # the merger keeps the base's tensors it needs
    say(1, steps, "evaluating the fine-tune")
    ft_point = evaluator.measure(ft, tok, 1.0)
    task_range = (base_point.task, ft_point.task)
    base_point = _with_retention(base_point, task_range)
    ft_point = _with_retention(ft_point, task_range)
    points = []
    for i, weight in enumerate(s.grid):
        say(2 + i, steps, f"lambda {weight}")
        t = time.perf_counter()
        merger.set_weight(weight)
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()
        points.append(evaluator.measure(ft, tok, weight, task_range, time.perf_counter() - t))
    merger.restore_finetune()
    say(steps, steps, "done")
    selection = select(base_point, ft_point, points, settings.policy)
    timings = _timings(loaded - started, time.perf_counter() - started,
                       [base_point, ft_point], points)
    base_name, finetune_name = names or (str(base_dir), str(finetune_dir))
    return SweepReport(base_name, finetune_name, s.method, evaluator.task.name,
                       evaluator.judge.name, base_point, ft_point, points, selection, timings,
                       settings.model_dump())


def _timings(load_s: float, total: float, ends: list[SweepPoint],
             points: list[SweepPoint]) -> dict[str, float]:
    """The report's timings: loading, merging, evaluating, and what the evaluation cost."""
    evaluated = [*ends, *points]
    eval_s = sum(p.eval_seconds for p in evaluated)
    return {"load_seconds": round(load_s, 3),
            "merge_seconds": round(sum(p.merge_seconds for p in points), 4),
            "eval_seconds": round(eval_s, 3), "total_seconds": round(total, 3),
            "overhead_share": round(1 - eval_s / total, 4),
            "generated_tokens_per_second": round(
                sum(p.generated_tokens for p in evaluated) / max(eval_s, 1e-9), 1)}


def _with_retention(point: SweepPoint, task_range: tuple[float, float]) -> SweepPoint:
    return replace(point, retention=retention(point.task, *task_range))


def write_report(report: SweepReport, path: Path) -> tuple[Path, Path]:
    """The report as JSON (with the raw generations) at `path`, and its plot beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(generations=True), indent=2) + "\n")
    tmp.replace(path)
    return path, plot(report, path.with_suffix(".png"))


def plot(report: SweepReport, path: Path) -> Path:
    """ASR, over-refusal and task retention against lambda, the selected point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [report.base_point, *report.points, report.finetune_point]
    xs = [p.weight for p in pts]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(xs, [p.asr for p in pts], "o-", color="#c0392b", label="attack success rate")
    ax.plot(xs, [p.over_refusal for p in pts], "s--", color="#7f8c8d", label="over-refusal")
    ax.plot(xs, [p.retention if p.retention is not None else 0 for p in pts], "^-",
            color="#2471a3", label="task retention")
    chosen = report.selection.weight
    if chosen is not None:
        ax.axvline(chosen, color="#27ae60", lw=1.5, ls=":",
                   label=f"selected lambda {chosen}" if report.selection.publish
                   else f"best lambda {chosen} (not published)")
    ax.set_xlabel("lambda (fine-tune weight): 0 = base, 1 = fine-tune")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    ax.set_title(f"{report.method} merge sweep", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
