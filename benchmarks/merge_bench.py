"""Merge benchmark: safeguard-bot vs mergekit vs the I/O floor, in one run, on one machine.

Builds a random Llama-style pair in bf16 (hidden 2048, 8 layers, vocab 32000: about 1.1 GB each),
the base in 2 GB shards and the fine-tune in 300 MB shards, then times, as separate processes:

  floor      cat both models' weights to /dev/null, then cp the fine-tune's folder (read 2, write 1)
  ours       safeguard-bot merge BASE FT OUT --method linear --weight 0.5
  mergekit   mergekit-yaml with the same linear merge (weights [0.5, 0.5])

Each is run --repeats times (default 5), after a sync (page cache warm for all, as the pair was
just written, and no dirty pages pending from an earlier run); wall time is the best run, with
the median beside it; peak RSS is the largest (GNU time's %M). Ratios are against the peers
measured in this same run. The two merged outputs are compared for agreement.

    python benchmarks/merge_bench.py [--workdir DIR] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bot.merge.checkpoint import Checkpoint, ShardedWriter, TensorSpec, parse_size
from bot.zoo.random_models import word_tokenizer

CONFIG = {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 8,
          "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632,
          "tie_word_embeddings": False, "max_position_embeddings": 2048,
          "architectures": ["LlamaForCausalLM"]}


def write_random_model(out: Path, config: LlamaConfig, shard_size: str, seed: int,
                       base: Path | None = None, scale: float = 0.002) -> Path:
    """A random bf16 Llama checkpoint, streamed tensor by tensor (or base + scale * noise)."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = ShardedWriter(out, specs, parse_size(shard_size))
    source = Checkpoint(base) if base else None
    g = torch.Generator().manual_seed(seed)
    for spec in specs:
        t = torch.randn(spec.shape, generator=g) * (scale if source else 0.02)
        if source:
            t += source.read(spec.name).float()
        writer.append(spec.name, t.to(torch.bfloat16))
    writer.close()
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    word_tokenizer(1000).save_pretrained(out)
    return out


def measure(cmd: str, repeats: int, cleanup: Path | None) -> dict:
    """Best wall time and largest peak RSS of a shell command over `repeats` runs."""
    walls, rss = [], []
    for _ in range(repeats):
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        os.sync()  # no earlier run's dirty pages left to throttle this run's writes
        start = time.perf_counter()
        # GNU time reports the command's own peak RSS; wait4 on a child of this (large) Python
        # process would report this process's RSS inherited at fork
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "bash", "-c", cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            sys.exit(f"failed: {cmd}\n{proc.stderr[-2000:]}")
        rss.append(int(proc.stderr.strip().splitlines()[-1]) * 1024)
    return {"cmd": cmd, "wall_s": round(min(walls), 2),
            "median_wall_s": round(statistics.median(walls), 2),
            "walls_s": [round(w, 2) for w in walls], "peak_rss_bytes": max(rss)}


def max_abs_difference(a: Path, b: Path) -> float:
    ca, cb = Checkpoint(a), Checkpoint(b)
    return max((ca.read(n).float() - cb.read(n).float()).abs().max().item() for n in ca.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**CONFIG)
    base, ft = work / "base", work / "ft"
    if not (ft / "config.json").exists():
        write_random_model(base, config, "2GB", seed=0)
        write_random_model(ft, config, "300MB", seed=1, base=base)
    model_bytes = Checkpoint(base).nbytes
    (work / "mergekit.yml").write_text(json.dumps({
        "merge_method": "linear", "dtype": "bfloat16",
        "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                   {"model": str(ft), "parameters": {"weight": 0.5}}]}))
    bot = Path(sys.executable).with_name("safeguard-bot")
    mk = Path(sys.executable).with_name("mergekit-yaml")
    runs = {
        "floor": measure(f"cat {base}/*.safetensors {ft}/*.safetensors > /dev/null && "
                         f"cp -r {ft} {work}/floor-out", args.repeats, work / "floor-out"),
        "ours": measure(f"{bot} merge {base} {ft} {work}/ours-out --method linear "
                        f"--weight 0.5 --json", args.repeats, work / "ours-out"),
        "mergekit": measure(f"{mk} {work}/mergekit.yml {work}/mk-out", args.repeats,
                            work / "mk-out"),
    }
    result = {
        "model_bytes": model_bytes, "threads": torch.get_num_threads(), "runs": runs,
        "speedup_vs_mergekit": round(runs["mergekit"]["wall_s"] / runs["ours"]["wall_s"], 2),
        "median_speedup_vs_mergekit": round(runs["mergekit"]["median_wall_s"]
                                            / runs["ours"]["median_wall_s"], 2),
        "ours_vs_floor": round(runs["ours"]["wall_s"] / runs["floor"]["wall_s"], 2),
        "ours_rss_share_of_model": round(runs["ours"]["peak_rss_bytes"] / model_bytes, 3),
        "max_abs_difference_ours_vs_mergekit": max_abs_difference(work / "ours-out",
                                                                  work / "mk-out"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model: {model_bytes / 1e9:.2f} GB bf16 per input, torch threads {result['threads']}")
    print("| run | best wall (s) | median wall (s) | peak RSS (MB) |\n|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['wall_s']} | {run['median_wall_s']} | "
              f"{run['peak_rss_bytes'] / 1e6:.0f} |")
    print(f"speedup vs mergekit: {result['speedup_vs_mergekit']}x best, "
          f"{result['median_speedup_vs_mergekit']}x median; ours / floor: "
          f"{result['ours_vs_floor']}x; ours peak RSS / model size: "
          f"{result['ours_rss_share_of_model']}; max |ours - mergekit|: "
          f"{result['max_abs_difference_ours_vs_mergekit']}")


if __name__ == "__main__":
    main()
