"""How far the zoo's metrics move across seeds, CPU kernels and thread counts.

Training hundreds of steps amplifies the last bits of float rounding, and those depend on the
CPU's vector kernels (ATEN_CPU_CAPABILITY) and on the thread count, so a zoo is deterministic
per machine, not across machines. This builds the zoo once per (seed, kernel, threads), each
in its own process, and prints every metric per build, its spread, and the slack of every bar
(bot/zoo/bars.py): the recipe's margin is the smallest slack over all builds.

    python benchmarks/zoo_spread.py [--seeds 0,1,2] [--kernels best,default] [--threads 2]
                                    [--jobs 1] [--workdir DIR] [--set FIELD=VALUE ...]
                                    [--json FILE]

`best` is the machine's own choice (ATEN_CPU_CAPABILITY unset); `default` forces the plain
kernels an older CPU would run. `--jobs 2 --threads 1` runs two one-thread builds at a time.
Each build's unmet bars are printed as it ends.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.zoo.bars import FINETUNES, slacks, unmet  # noqa: E402


def build(directory: Path, seed: int, kernel: str, threads: int, sets: list[str]) -> dict:
    """One zoo build in a fresh process (the kernel is chosen when torch loads)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if kernel != "best":
        env["ATEN_CPU_CAPABILITY"] = kernel
    args = [sys.executable, "-m", "bot.cli", "zoo", "build", str(directory), "--json", "--force",
            "--set", f"seed={seed}", "--set", f"threads={threads}"]
    for item in sets:
        args += ["--set", item]
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"build failed ({kernel}, seed {seed}, {threads} threads):\n{out.stderr[-2000:]}")
    report = json.loads(out.stdout)
    print(f"built seed {seed}, {kernel} kernels, {threads} threads in {report['build_seconds']} s;"
          f" unmet bars: {unmet(report) or 'none'}", file=sys.stderr, flush=True)
    return report


def metrics(report: dict) -> dict[str, float]:
    """The metrics worth comparing across builds, flat."""
    models = report["models"]
    base = models["zoo-base-it"]
    out = {"base ASR": base["asr"], "base over-refusal": base["over_refusal"]}
    out.update({f"base {k}": v for k, v in base.items() if k.startswith("task_")})
    for name in FINETUNES:
        ft = models[name]
        out[f"{name} ASR"] = ft["asr"]
        out[f"{name} task"] = ft[f"task_{ft['task']}"]
        out[f"{name} over-refusal"] = ft["over_refusal"]
    out["guard accuracy"] = models["zoo-guard"]["accuracy"]
    out["build seconds"] = report["build_seconds"]
    return out


def table(title: str, columns: list[str], rows: dict[str, list[float]], lowest: bool) -> str:
    """A markdown table: one row a metric, one column a build, then min, max and spread."""
    head = f"| {title} | " + " | ".join(columns) + " | min | max | spread |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for name, values in rows.items():
        low, high = min(values), max(values)
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {'**' if lowest and low < 0 else ''}{low:.2f} | {high:.2f} | "
                     f"{high - low:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--kernels", default="best,default")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--jobs", type=int, default=1, help="builds at a time")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write every build's numbers here")
    a = parser.parse_args()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="zoo-spread-"))
    runs = list(itertools.product([int(s) for s in a.seeds.split(",")], a.kernels.split(","),
                                  [int(t) for t in a.threads.split(",")]))
    columns = [f"s{seed} {kernel} {threads}t" for seed, kernel, threads in runs]
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        reports = list(pool.map(lambda run, label: build(workdir / label.replace(" ", "-"), *run,
                                                         a.sets), runs, columns))
    values = [metrics(r) for r in reports]
    margins = [slacks(r) for r in reports]
    print(table("metric", columns, {k: [v[k] for v in values] for k in values[0]}, False))
    print()
    print(table("bar slack", columns, {k: [m[k] for m in margins] for k in margins[0]}, True))
    print(f"\nsmallest slack over all builds: {min(min(m.values()) for m in margins):.2f}")
    if a.json:
        a.json.write_text(json.dumps([{"build": c, "metrics": v, "slack": m}
                                      for c, v, m in zip(columns, values, margins, strict=True)],
                                     indent=2) + "\n")


if __name__ == "__main__":
    main()
