"""Sweep benchmark: our in-place sweep vs the naive pipeline, same evaluations, one run.

On a zoo pair (default zoo-base-it + zoo-ft-flip, the zoo settings of bot/zoo/evaluate.toml,
grid 0.2,0.4,0.5,0.6,0.8), times:

  ours   run_sweep: load base and fine-tune once, write each lambda's merge into the model's
         parameters in place, evaluate (base, fine-tune, 5 merges)
  naive  for base, fine-tune and each lambda: `safeguard-bot merge` to disk (a process, as a
         script would run it), load the checkpoint from disk, evaluate with the same Evaluator

Both run in this process after the same imports (torch, transformers' Llama), so neither pays
them in its time; the naive pipeline's merge processes pay their own, as they would in a
script. Reported: wall time of each (best and median of --repeats), our non-evaluation
overhead (everything but generation and scoring, as a share of our total), the speedup, and
generated tokens per second. Both pipelines' numbers must agree point by point.

    python benchmarks/sweep_bench.py [--zoo .cache/zoo] [--finetune zoo-ft-flip] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import transformers.models.llama.modeling_llama  # noqa: F401  (the import both pay up front)
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from bot.config import load_settings
from bot.stages import evaluator_for, sweep_refs
from bot.zoo.build import build_zoo

ROOT = Path(__file__).resolve().parent.parent
GRID = [0.2, 0.4, 0.5, 0.6, 0.8]
TASKS = {"zoo-ft-flip": "flip", "zoo-ft-echo": "echo", "zoo-ft-newtoken": "newtoken"}


def ours(base: Path, ft: Path, settings) -> tuple[float, dict]:
    started = time.perf_counter()
    report = sweep_refs(str(base), str(ft), settings)
    total = time.perf_counter() - started
    return total, {"eval": sum(p.eval_seconds for p in
                               [report.base_point, report.finetune_point, *report.points]),
                   "points": [(p.weight, p.asr, p.over_refusal, p.task) for p in report.points],
                   "tokens_per_second": report.timings["generated_tokens_per_second"]}


def naive(base: Path, ft: Path, settings, work: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    evaluator = evaluator_for(settings.evaluate)
    points, eval_s = [], 0.0
    for weight in [0.0, 1.0, *GRID]:
        if weight in (0.0, 1.0):
            model_dir = base if weight == 0.0 else ft
        else:
            model_dir = work / f"merge-{weight}"
            subprocess.run([sys.executable, "-m", "bot.cli", "merge", str(base), str(ft),
                            str(model_dir), "--weight", str(weight), "--overwrite", "--json"],
                           check=True, capture_output=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        point = evaluator.measure(model, tok, weight)
        eval_s += point.eval_seconds
        if weight not in (0.0, 1.0):
            points.append((weight, point.asr, point.over_refusal, point.task))
    return time.perf_counter() - started, {"eval": eval_s, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    parser.add_argument("--finetune", default="zoo-ft-flip", choices=sorted(TASKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    build_zoo(args.zoo)
    base, ft = args.zoo / "zoo-base-it", args.zoo / args.finetune
    settings = load_settings(ROOT / "bot" / "zoo" / "evaluate.toml", [
        f"sweep.grid={json.dumps(GRID)}",
        f"evaluate.task_file={args.zoo / 'prompts' / f'{TASKS[args.finetune]}_heldout.jsonl'}"])
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    runs: dict[str, list[tuple[float, dict]]] = {"ours": [], "naive": []}
    try:
        for _ in range(args.repeats):  # alternate, so drift hits both
            runs["ours"].append(ours(base, ft, settings))
            runs["naive"].append(naive(base, ft, settings, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if runs["ours"][0][1]["points"] != runs["naive"][0][1]["points"]:
        sys.exit(f"the pipelines disagree: {runs['ours'][0][1]['points']} vs "
                 f"{runs['naive'][0][1]['points']}")
    result = {}
    for name, rs in runs.items():
        times = [t for t, _ in rs]
        overhead = [1 - info["eval"] / t for t, info in rs]
        result[name] = {"best_s": round(min(times), 2),
                        "median_s": round(statistics.median(times), 2),
                        "non_eval_share_median": round(statistics.median(overhead), 3)}
    result["speedup_best"] = round(result["naive"]["best_s"] / result["ours"]["best_s"], 2)
    result["speedup_median"] = round(result["naive"]["median_s"] / result["ours"]["median_s"], 2)
    result["tokens_per_second_median"] = statistics.median(
        info["tokens_per_second"] for _, info in runs["ours"])
    result["points"] = runs["ours"][0][1]["points"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"5-point sweep of {args.finetune} on {base.name} ({args.repeats} runs each)")
    for name in ("ours", "naive"):
        r = result[name]
        print(f"  {name:6} best {r['best_s']:6.2f} s   median {r['median_s']:6.2f} s   "
              f"non-evaluation share {100 * r['non_eval_share_median']:.1f}%")
    print(f"  speedup {result['speedup_best']}x best, {result['speedup_median']}x median; "
          f"generation {result['tokens_per_second_median']:.0f} tokens/s")


if __name__ == "__main__":
    main()
