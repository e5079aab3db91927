"""Day benchmark: a day's candidates on the local hub, drained by W concurrent workers vs 1.

Seeds a local hub (bot/localhub) with the zoo's base, --candidates fine-tunes (copies of
zoo-ft-echo, zoo-ft-flip and zoo-ft-newtoken under distinct names; every sixth opted in, so
some get pull requests and the rest variants) and the six decoys of bot/zoo/seed.py. Then, for
1 worker (the peer) and for --workers, each with its own bot account, work dir, SQLite ledger,
feed dataset and Hugging Face cache, and --threads torch threads per worker (default 1, for
both runs: the speedup is what concurrent workers add, not intra-op threading; workers that
each take every core oversubscribe the machine):

  discovery  `safeguard-bot run --once --discover-only --json` (one process)
  workers    W `safeguard-bot run --once --json` processes started together on that ledger;
             every candidate goes sweep (grid [0.5]) -> merge -> publish -> feed

Reported: the workers' wall time (first start to last exit, imports included), candidates per
minute (and per worker), how many each worker took (the ledger's `worker` column), double
claims (ledger attempts > 1, a candidate in two workers' outputs, feed records per candidate
on the hub != 1), ledger contention (the latency of a claim by a fifth process that probes the
ledger every 0.2 s during the run: it takes the same write lock as the workers' claims) and
the feed's append conflicts (412 answers to commits on the feed dataset, from the hub's
request log), plus the Hub requests one candidate costs by the Hub's rate-limit buckets, and
the workers' CPU time (the cores they got: the machine may be shared) and the load before.

    python benchmarks/day_bench.py [--candidates 24] [--workers 4] [--threads T] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.utils import disable_progress_bars

from bot.demo import pointed_at
from bot.ledger import Ledger
from bot.localhub import LocalHub
from bot.zoo.build import build_zoo
from bot.zoo.seed import OPT_IN_TAG, card, seed_decoys, upload

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "safeguard-bot"
CONFIG = ROOT / "bot" / "zoo" / "evaluate.toml"
KINDS = [("zoo-ft-echo", "echo"), ("zoo-ft-flip", "flip"), ("zoo-ft-newtoken", "newtoken")]
BASE_OWNER, FT_OWNER = ("alice", "hf_alice_day_token", "safeguard"), ("carol", "hf_carol_day")
BASE = "safeguard/zoo-base-it"
OPT_IN_EVERY = 6
SIZE_LIMIT_GB = 0.005  # the zoo's models are ~3 MB; the big decoy is 6 MB
PROBE_INTERVAL_S = 0.2
PROBE = """
import json, os, sys, time
from bot.ledger import Ledger
ledger, stop, waits = Ledger(sys.argv[1]), sys.argv[2], []
print("ready", flush=True)
while not os.path.exists(stop):
    t = time.perf_counter()
    ledger.claim("probe", "probe/none", "none")  # BEGIN IMMEDIATE: the workers' write lock
    waits.append(time.perf_counter() - t)
    time.sleep(float(sys.argv[3]))
print(json.dumps(waits))
"""
REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


class RequestLog(logging.Handler):
    """The local hub's access log, tagged with the benchmark's current phase."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.phase = "seed"
        self.requests: list[tuple[str, str, str, int]] = []  # phase, method, path, status
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        m = REQUEST.search(record.getMessage())
        if m:
            with self._lock:
                self.requests.append((self.phase, m["method"], m["path"].split("?")[0],
                                      int(m["status"])))

    def of(self, phase: str) -> list[tuple[str, str, int]]:
        with self._lock:
            return [(m, p, s) for ph, m, p, s in self.requests if ph == phase]


def bucket(path: str) -> str:
    """The Hub's rate-limit bucket of a request (docs: Hub rate limits): resolvers are URLs
    with /resolve/, the API is /api/...; LFS transfers are counted apart."""
    if "/resolve/" in path:
        return "resolvers"
    if path.startswith("/api/"):
        return "api"
    if path.startswith("/lfs-upload/") or ".git/info/lfs" in path:
        return "lfs"
    return "other"


def route(method: str, path: str) -> str:
    """A request's route with repo ids and revisions abstracted, e.g. GET /api/models/{repo}."""
    path = re.sub(r"^/api/(models|datasets)/[^/]+/[^/]+", r"/api/\1/{repo}", path)
    path = re.sub(r"/(revision|tree|commit|preupload|paths-info|discussions)/[^/]+",
                  r"/\1/{rev}", path)
    path = re.sub(r"^/(datasets/)?[^/]+/[^/]+/resolve/[^/]+/.*", r"/\1{repo}/resolve/{rev}/{file}",
                  path)
    path = re.sub(r"^/[^/]+/[^/]+\.git/", "/{repo}.git/", path)
    path = re.sub(r"^/lfs-upload/.*", "/lfs-upload/{oid}", path)
    return f"{method} {path}"


def seed(hub: LocalHub, zoo: Path, n: int) -> dict[str, str]:
    """The base, n fine-tunes and the decoys; returns each fine-tune's task file."""
    base_api = HfApi(endpoint=hub.url, token=BASE_OWNER[1])
    ft_api = HfApi(endpoint=hub.url, token=FT_OWNER[1])
    upload(base_api, BASE, zoo / "zoo-base-it", card(None, ["safety-aligned"],
                                                     title="zoo-base-it"))
    tasks = {}
    for i in range(n):
        folder, task = KINDS[i % len(KINDS)]
        repo = f"{FT_OWNER[0]}/day-{i:03d}-{task}"
        tags = ["fine-tune", *([OPT_IN_TAG] if i % OPT_IN_EVERY == 0 else [])]
        upload(ft_api, repo, zoo / folder, card(BASE, tags, title=repo))
        tasks[repo] = str(zoo / "prompts" / f"{task}_heldout.jsonl")
    seed_decoys(ft_api, zoo, BASE, FT_OWNER[0], 6_000_000)
    return tasks


def drain(hub: LocalHub, log: RequestLog, tasks: dict[str, str], workers: int,
          threads: int, root: Path) -> dict:
    """Discovery, then `workers` processes on one ledger, `threads` torch threads each; what
    they did and what it cost."""
    bot, token = f"bot-w{workers}", f"hf_bot_w{workers}_token"
    hub.add_user(bot, token)
    work, feed_repo = root / f"work-w{workers}", f"{bot}/day-results"
    cache = root / f"hf-cache-w{workers}"  # a fresh cache per run: both runs download alike
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEGUARD_")}
    env.update(hub.env(token), HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = ["--workdir", str(work), "--config", str(CONFIG), "--json",
            "--set", f"watch.bases={BASE}", "--set", f"watch.max_model_gb={SIZE_LIMIT_GB}",
            "--set", f"watch.max_candidates={len(tasks) + 10}",
            "--set", f"watch.scan_per_base={max(200, len(tasks) + 20)}",
            "--set", "sweep.grid=[0.5]", "--set", f"evaluate.task_files={json.dumps(tasks)}",
            "--set", f"publish.feed_repo={feed_repo}"]

    log.phase = f"discovery-w{workers}"
    started = time.perf_counter()
    found = json.loads(subprocess.run([str(CLI), "run", "--once", "--discover-only", *args],
                                      env=env, check=True, capture_output=True,
                                      text=True).stdout)
    discovery_s = time.perf_counter() - started

    stop = root / f"stop-w{workers}"
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(work / "ledger.sqlite"),
                              str(stop), str(PROBE_INTERVAL_S)],
                             env={**env, "PYTHONPATH": str(ROOT)}, text=True,
                             stdout=subprocess.PIPE)
    assert probe.stdout.readline() == "ready\n"
    log.phase = f"workers-w{workers}"
    outs = [(work / f"worker-{i}.out").open("w+") for i in range(workers)]
    errs = [(work / f"worker-{i}.err").open("w+") for i in range(workers)]
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    procs = [subprocess.Popen([str(CLI), "run", "--once", *args], env=env, stdout=outs[i],
                              stderr=errs[i], text=True) for i in range(workers)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before  # the workers' CPU time (the probe is reaped later)
    stop.touch()
    waits = json.loads(probe.communicate()[0])
    log.phase = "verify"

    results = []
    for out, err in zip(outs, errs, strict=True):
        out.seek(0)
        err.seek(0)
        text = out.read()
        try:
            results.append(json.loads(text))
        except json.JSONDecodeError:
            results.append({"processed": [], "error": (text + err.read())[-2000:]})
        out.close()
        err.close()
    pid_to_worker = {p.pid: i for i, p in enumerate(procs)}
    with Ledger(work / "ledger.sqlite") as ledger:
        entries = ledger.entries()
    claimed = [e for e in entries if e.worker is not None]
    taken = Counter(pid_to_worker.get(int(e.worker.rsplit(":", 1)[1]), -1) for e in claimed)
    statuses = Counter(e.status for e in claimed)
    outputs = Counter((p["repo"], p["revision"]) for r in results for p in r["processed"])
    try:  # the feed dataset exists once a worker has appended to it
        feed_lines = Path(hf_hub_download(feed_repo, "results.jsonl", repo_type="dataset",
                                          endpoint=hub.url, token=token,
                                          cache_dir=root / "verify")).read_text().splitlines()
    except (EntryNotFoundError, HfHubHTTPError):
        feed_lines = []
    records = Counter((r["repo"], r["revision"]) for r in map(json.loads, feed_lines))
    expected = {(c["repo"], c["revision"]) for c in found["candidates"]}
    requests = log.of(f"workers-w{workers}")
    feed_commit = f"/api/datasets/{feed_repo}/commit/"
    listings = sum(1 for m, p, _ in requests if m == "GET" and p == "/api/models")
    per_candidate = Counter(bucket(p) for m, p, _ in requests
                            if not (m == "GET" and p == "/api/models"))
    routes = Counter(route(m, p) for m, p, _ in requests)
    timings = [p.get("timings", {}) for r in results for p in r["processed"]]
    steps = [sum(v for k, v in t.items() if not k.startswith("sweep_")) for t in timings]
    step_names = sorted({k for t in timings for k in t})
    n = len(expected)
    return {
        "workers": workers, "threads_per_worker": threads, "candidates": n,
        "skips": len(found["skips"]),
        "discovery_s": round(discovery_s, 2),
        "discovery_requests": dict(Counter(bucket(p) for _, p, _ in
                                           log.of(f"discovery-w{workers}"))),
        "wall_s": round(wall, 2),
        "workers_cpu_s": round(cpu, 1), "cores_used": round(cpu / wall, 2),
        "cpu_s_per_candidate": round(cpu / n, 2),
        "load_avg_1min_before": round(load_before, 2),
        "candidates_per_min": round(n / wall * 60, 2),
        "per_worker_per_min": round(n / wall * 60 / workers, 2),
        "taken_per_worker": [taken.get(i, 0) for i in range(workers)],
        "exit_codes": codes, "statuses": dict(statuses),
        "errors": [r["error"] for r in results if "error" in r],
        "candidate_s_median": round(statistics.median(steps), 2) if steps else None,
        "step_s_median": {k: round(statistics.median(t.get(k, 0.0) for t in timings), 2)
                          for k in step_names},
        "double_claims": {
            "ledger_attempts_over_1": sum(1 for e in claimed if e.attempts > 1),
            "in_two_outputs": sum(c - 1 for c in outputs.values() if c > 1),
            "feed_records_over_1": sum(c - 1 for c in records.values() if c > 1),
            "feed_missing": len(expected - set(records)),
            "not_processed": len(expected - {e.key for e in claimed
                                             if e.status in ("published", "skipped")})},
        "feed_records": sum(records.values()),
        "feed_commits": sum(1 for m, p, s in requests if m == "POST"
                            and p.startswith(feed_commit) and s == 200),
        "feed_conflicts_412": sum(1 for m, p, s in requests if m == "POST"
                                  and p.startswith(feed_commit) and s == 412),
        "hub_retryable_answers": sum(1 for _, _, s in requests if s == 429 or s >= 500),
        "probe_claim_ms": _stats([w * 1000 for w in waits]),
        "requests": {"total": len(requests), "listings": listings,
                     "per_candidate": {k: round(v / n, 1) for k, v in
                                       sorted(per_candidate.items())},
                     "per_candidate_total": round(sum(per_candidate.values()) / n, 1),
                     "routes_per_candidate": {k: round(v / n, 2) for k, v in
                                              routes.most_common()}},
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 1),
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "max": round(ordered[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    if min(a.candidates, a.workers, a.threads) < 1:
        parser.error("--candidates, --workers and --threads must be at least 1")
    started = time.perf_counter()
    build_zoo(a.zoo)  # cached by its recipe's hash
    disable_progress_bars()
    log = RequestLog()
    hub_log = logging.getLogger("bot.localhub")
    hub_log.setLevel(logging.DEBUG)
    hub_log.addHandler(log)
    hub_log.propagate = False
    runs = []
    with tempfile.TemporaryDirectory(prefix="day-bench-") as tmp:
        root = Path(tmp)
        hub = LocalHub(root / "hub").start(port=0)
        try:
            for name, token, *orgs in (BASE_OWNER, FT_OWNER):
                hub.add_user(name, token, orgs=orgs)
            with pointed_at(hub.url, FT_OWNER[1]):
                t = time.perf_counter()
                tasks = seed(hub, a.zoo, a.candidates)
                seed_s = time.perf_counter() - t
                for workers in sorted({1, a.workers}):
                    runs.append(drain(hub, log, tasks, workers, a.threads, root))
        finally:
            hub.stop()
    peer, main_run = runs[0], runs[-1]
    out = {"candidates": a.candidates, "workers": a.workers, "cores": os.cpu_count(),
           "seed_s": round(seed_s, 1), "runs": runs,
           "speedup": round(peer["wall_s"] / main_run["wall_s"], 2),
           "total_s": round(time.perf_counter() - started, 1)}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"day_bench: {a.candidates} fine-tunes + decoys on the local hub, grid [0.5], "
          f"{os.cpu_count()} cores; seeding {out['seed_s']} s")
    print("workers  threads  wall s  cand/min  per worker/min  taken per worker  median cand s  "
          "CPU s/cand  cores used  load before  feed commits/412s  probe claim ms p50/p99/max")
    for r in runs:
        p = r["probe_claim_ms"]
        print(f"{r['workers']:>7}  {r['threads_per_worker']:>7}  {r['wall_s']:>6}  "
              f"{r['candidates_per_min']:>8}  "
              f"{r['per_worker_per_min']:>14}  {str(r['taken_per_worker']):>16}  "
              f"{r['candidate_s_median']!s:>13}  {r['cpu_s_per_candidate']:>10}  "
              f"{r['cores_used']:>10}  {r['load_avg_1min_before']:>11}  "
              f"{r['feed_commits']:>8}/{r['feed_conflicts_412']:<8}  "
              f"{p.get('p50')}/{p.get('p99')}/{p.get('max')} (n={p['n']})")
    for r in runs:
        d = r["double_claims"]
        print(f"{r['workers']} worker(s): statuses {r['statuses']}, exit codes "
              f"{r['exit_codes']}, double claims {d['ledger_attempts_over_1']} (ledger) / "
              f"{d['in_two_outputs']} (outputs) / {d['feed_records_over_1']} (feed), feed "
              f"records {r['feed_records']} for {r['candidates']} candidates, not processed "
              f"{d['not_processed']}; discovery {r['discovery_s']} s "
              f"(requests {r['discovery_requests']})")
        print(f"  median seconds per candidate step: {r['step_s_median']}")
        q = r["requests"]
        print(f"  hub requests per candidate: {q['per_candidate_total']} {q['per_candidate']} "
              f"(+ {q['listings']} listing calls in all, one pair per worker)")
        for e in r["errors"]:
            print(f"  worker error: {e.strip().splitlines()[-1]}")
    print(f"speedup of {a.workers} workers over 1: {out['speedup']}x; total {out['total_s']} s")


if __name__ == "__main__":
    main()
