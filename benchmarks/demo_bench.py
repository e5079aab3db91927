"""Demo benchmark: the demo's wall time on this checkout vs another (a baseline commit).

Runs `python -m bot.cli demo --json` in a fresh work dir, with the zoo already built (--zoo),
alternately from the baseline checkout and from this one, --runs times each, and reports each
side's times, medians and the ratio (this / baseline). Interleaving spreads the machine's other
load over both sides. The baseline is a checkout of an earlier commit (`git worktree add DIR
COMMIT`); both run with this interpreter, so only the bot's code differs.

    python benchmarks/demo_bench.py --baseline /tmp/base-checkout [--runs 3] [--zoo .cache/zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_seconds(checkout: Path, zoo: Path) -> float:
    """Wall seconds of one demo run from `checkout` in a fresh work dir (imports included)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "bot.cli", "demo", "--workdir",
                              str(Path(tmp) / "demo"), "--zoo", str(zoo), "--json"],
                             cwd=checkout, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"demo failed in {checkout}:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout)
    if not any(p["status"] == "published" for p in result["processed"]):
        raise SystemExit(f"demo in {checkout} published nothing: {out.stdout[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="an earlier checkout")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"baseline": [], "this": []}
    demo_seconds(ROOT, args.zoo)  # warm the disk cache: not counted
    for _ in range(args.runs):
        times["baseline"].append(demo_seconds(args.baseline.resolve(), args.zoo))
        times["this"].append(demo_seconds(ROOT, args.zoo))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                      "median": {k: round(v, 2) for k, v in medians.items()},
                      "ratio_this_over_baseline": round(medians["this"] / medians["baseline"],
                                                        3)}, indent=2))


if __name__ == "__main__":
    main()
