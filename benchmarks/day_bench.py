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

Chaos mode (--chaos): the same day, once, with --workers workers sharing one PostgreSQL ledger
(a fresh schema on --ledger-url, else on the server `scripts/postgres start` gives; dropped at
the end unless --keep-ledger) while the hub misbehaves, and with hostile repos seeded beside
the fine-tunes and decoys:

  faults     through the hub's fault mode (bot/localhub/faults.py), seeded, counted per fault:
             ~10% of all requests fail transiently (503 3%, 502 2%, 429 with a 1 s reset 2%,
             dropped connection 2%, a 3.5 s stall 1%, longer than the workers' 2 s
             hub.read_timeout); the first two pull-request commits land but answer 503; the
             first feed commit lands but answers 503, and the next 8 x workers feed commits
             fail, so some feed pushes give up and their records wait in the ledger
  hostile    a config.json of 100,000 nested brackets (must end skipped), a zoo-ft-echo with
             hidden_act "not-an-activation" (transformers refuses it at load: must end failed
             after ledger.max_attempts, with a one-line reason, no worker crashing), a 2 MB
             config.json over hub.max_file_mb = 1 (skipped), and a fine-tune its owner deletes
             after discovery, while it is queued (skipped, "gone from the Hub")
  settings   short Hub retries (hub.retries 1, 0.2 s apart), ledger.retry_seconds 2 (max 8 s),
             ledger.max_attempts 3, and a sweep grid where this machine's zoo publishes every
             kind of fine-tune (`chaos_grid`; [0.5] publishes only some kinds on some machines)
  drain      discovery, the owner's deletion, then rounds of W `run --once` workers until the
             ledger holds nothing queued and nothing failed with attempts left (waiting out
             retry_at between rounds; at most --max-rounds), then one `run --once` with the
             faults cleared, which pushes the feed records still pending

Reported (JSON with --json): candidates published, skipped by reason, failed (with reasons)
and still waiting; double claims (a published entry with ledger attempts > 1, a candidate
published in two workers' outputs); pull requests per opted-in repo with the revision's marker
in the title (exactly 1 each); feed records on the hub (exactly one per candidate and decision,
none lost, none left pending); entries left running; each fault's matched and injected
requests; wall time and rounds. The goal: every well-formed fine-tune published, every hostile
repo and decoy ending as above, 0 duplicates, 0 lost, 0 left running, no crashed worker, the
ledger drained within the cap. A missed goal is printed as GOAL MISSED with what missed it, and
the exit status is 1.

The local hub derives tags from config.json with json.loads; before c9a3613 that raised
RecursionError on the nested config (a 500 for that repo and for every listing of the base, so
nothing would be discovered). Where a hub still does, chaos mode raises the recursion limit of
its own process, whose hub threads have deep stacks, so the run tests the bot, and reports it
as local_hub_bug (null: the hub served the repo as it is).

--pr-commit-hang adds one more fault, first in line: the first pull-request commit stalls
3.5 s (past the 2 s read timeout) and then lands, after the worker gave up on it: the bot must
still open one pull request for the revision.

    python benchmarks/day_bench.py --chaos [--candidates 12] [--workers 4] [--ledger-url URL]
        [--max-rounds 10] [--keep-ledger] [--pr-commit-hang] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import disable_progress_bars

from bot.demo import pointed_at
from bot.ledger import Ledger
from bot.localhub import Fault, LocalHub
from bot.publish.licenses import variant_name
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


def seed(hub: LocalHub, zoo: Path, n: int, decoys: bool = True) -> dict[str, str]:
    """The base, n fine-tunes and (unless not `decoys`) the decoys; returns each fine-tune's
    task file."""
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
    if decoys:
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
    env = _bot_env(hub, token, cache, threads)
    args = _bot_args(work, tasks, feed_repo)

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


def _bot_env(hub: LocalHub, token: str, cache: Path, threads: int) -> dict[str, str]:
    """A worker's environment: the local hub and the bot's token, its own download cache,
    `threads` torch threads, and no SAFEGUARD_ settings from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEGUARD_")}
    env.update(hub.env(token), HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _bot_args(work: Path, tasks: dict[str, str], feed_repo: str,
              settings: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`safeguard-bot run` options: the zoo's evaluation, the watched base, grid [0.5], each
    fine-tune's task file, the feed dataset, then `settings` (section.key=value)."""
    args = ["--workdir", str(work), "--config", str(CONFIG), "--json",
            "--set", f"watch.bases={BASE}", "--set", f"watch.max_model_gb={SIZE_LIMIT_GB}",
            "--set", f"watch.max_candidates={len(tasks) + 10}",
            "--set", f"watch.scan_per_base={max(200, len(tasks) + 20)}",
            "--set", "sweep.grid=[0.5]", "--set", f"evaluate.task_files={json.dumps(tasks)}",
            "--set", f"publish.feed_repo={feed_repo}"]
    for item in settings:
        args += ["--set", item]
    return args


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


# --- chaos mode -------------------------------------------------------------------------------

CHAOS_BOT = ("bot-chaos", "hf_bot_chaos_token")
CHAOS_READ_TIMEOUT_S = 2.0  # hub.read_timeout of the workers; the hang fault stalls longer
CHAOS_HANG_S = 3.5
CHAOS_MAX_ATTEMPTS = 3
# the workers' settings: short Hub retries, a small file cap, failed and deferred entries
# back within the run (2, 4, 8 s)
CHAOS_SETTINGS = (
    f"hub.read_timeout={CHAOS_READ_TIMEOUT_S}", "hub.connect_timeout=2", "hub.retries=1",
    "hub.retry_wait_seconds=0.2", "hub.max_file_mb=1", "ledger.retry_seconds=2",
    "ledger.max_retry_seconds=8", f"ledger.max_attempts={CHAOS_MAX_ATTEMPTS}")
FEED_PUSH_ATTEMPTS = 8  # bot/hub.py append_lines: commit tries per feed push
NESTED_DEPTH = 100_000
HUGE_CONFIG_BYTES = 2_000_000  # over hub.max_file_mb = 1
ROUND_TIMEOUT_S = 1800  # a round's workers still running then are killed (and reported)
MAX_WAIT_BETWEEN_ROUNDS_S = 30.0
# the hostile repos: (what it is, the zoo model copied, the status it must end with, a word its
# reason must hold)
HOSTILE = {
    "chaos-nested-config": (f"config.json of {NESTED_DEPTH:,} nested brackets", "zoo-ft-echo",
                            "skipped", "nested"),
    "chaos-bad-activation": ("zoo-ft-echo with hidden_act 'not-an-activation'", "zoo-ft-echo",
                             "failed", "not-an-activation"),
    "chaos-huge-config": (f"config.json of {HUGE_CONFIG_BYTES / 1e6:g} MB of valid JSON "
                          "(hub.max_file_mb = 1)", "zoo-ft-echo", "skipped", "max_file_mb"),
    "chaos-gone": ("a zoo-ft-flip copy deleted after discovery", "zoo-ft-flip", "skipped",
                   "gone"),
}
GONE = f"{FT_OWNER[0]}/chaos-gone"


def chaos_faults(feed_repo: str, workers: int, pr_commit_hang: bool = False) -> list[Fault]:
    """The faults of a chaos run, in the order the hub tries them (the first that fires wins):
    commits that land but answer 503, feed pushes that fail outright, then about 10% of every
    request failing transiently (seeded, so a rerun draws alike for the same request order).
    `pr_commit_hang`: first of all, the first pull-request commit stalls past the workers' read
    timeout, then lands (--pr-commit-hang)."""
    pr_commit = rf"^/api/models/{FT_OWNER[0]}/[^/]+/commit/"
    feed_commit = rf"^/api/datasets/{re.escape(feed_repo)}/commit/"
    first = [Fault("hang", path=pr_commit, method="POST", seconds=CHAOS_HANG_S, first=1)] \
        if pr_commit_hang else []
    return [
        *first,
        # two pull requests land, and their clients see 503: never opened twice
        Fault("status", path=pr_commit, method="POST", status=503, after=True, first=2),
        # the first feed commit lands, its client sees 503: the retry must not append it again
        Fault("status", path=feed_commit, method="POST", status=503, after=True, first=1),
        # then enough feed commits fail (not landing) that at least one push gives up and its
        # records wait in the ledger (feed_pending) for a later run
        Fault("status", path=feed_commit, method="POST", status=503,
              first=FEED_PUSH_ATTEMPTS * workers),
        Fault("status", status=503, probability=0.03, seed=1),
        Fault("status", status=502, probability=0.02, seed=2),
        Fault("status", status=429, seconds=1.0, probability=0.02, seed=3),
        Fault("drop", probability=0.02, seed=4),
        Fault("hang", seconds=CHAOS_HANG_S, probability=0.01, seed=5),
    ]


def postgres_url(given: str | None) -> str:
    """--ledger-url, else the loopback server `scripts/postgres start` starts (or reuses)."""
    if given:
        return given
    done = subprocess.run([str(ROOT / "scripts" / "postgres"), "start"], capture_output=True,
                          text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"day_bench: scripts/postgres start failed ({done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")
    return lines[-1]


@contextmanager
def fresh_schema(server: str, keep: bool) -> Iterator[tuple[str, str]]:
    """A new, empty schema on the PostgreSQL server: (the ledger URL that uses it, its name);
    dropped afterwards unless `keep`."""
    import sqlalchemy as sa

    base = sa.make_url(server)
    if base.drivername in ("postgresql", "postgres"):
        base = base.set(drivername="postgresql+psycopg")
    schema = f"day_chaos_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False), schema
    finally:
        if not keep:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def seed_hostile(api: HfApi, zoo: Path) -> dict[str, str]:
    """The hostile repos of HOSTILE, each with a card declaring the base; returns their task
    files."""
    tasks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, source, _, _) in HOSTILE.items():
            folder = Path(tmp) / name
            shutil.copytree(zoo / source, folder, ignore=shutil.ignore_patterns("README.md"))
            path = folder / "config.json"
            config = json.loads(path.read_text())
            if name == "chaos-nested-config":
                path.write_text("[" * NESTED_DEPTH + "]" * NESTED_DEPTH)
            elif name == "chaos-bad-activation":
                path.write_text(json.dumps({**config, "hidden_act": "not-an-activation"}))
            elif name == "chaos-huge-config":
                path.write_text(json.dumps({**config, "padding": "x" * HUGE_CONFIG_BYTES}))
            repo = f"{FT_OWNER[0]}/{name}"
            upload(api, repo, folder, card(BASE, ["fine-tune"], title=name,
                                           relation="finetune"))
            task = "flip" if source == "zoo-ft-flip" else "echo"
            tasks[repo] = str(zoo / "prompts" / f"{task}_heldout.jsonl")
    return tasks


def _survive_nested(hub: LocalHub, token: str) -> str | None:
    """The local hub derives tags from config.json with json.loads, which raises RecursionError
    on the nested config (a 500 for the repo's info and for every listing of the base: no
    candidate would be found at all). If it does, the hub's threads get a recursion limit deep
    enough (their stacks are large, see `chaos`) so the run tests the bot; the error is
    returned, to report. None: the hub serves the repo as it is."""
    api = HfApi(endpoint=hub.url, token=token)
    repo = f"{FT_OWNER[0]}/chaos-nested-config"
    try:
        api.model_info(repo)
        return None
    except HfHubHTTPError as e:
        error = " ".join(str(e).split())[-300:]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3 * NESTED_DEPTH))
    api.model_info(repo)  # raises if the workaround does not help
    return error


def _with_retries(call, what: str, tries: int = 10):
    """The benchmark's own Hub calls while faults are on (it has no retries of its own)."""
    for attempt in range(1, tries + 1):
        try:
            return call()
        except RepositoryNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - the faults: 5xx, 429, dropped connections
            if attempt == tries:
                raise SystemExit(f"day_bench: {what} failed {tries} times: {e}") from e
            time.sleep(0.5)


def _spawn(n: int, args: list[str], env: dict[str, str], logs: Path, tag: str) -> list[dict]:
    """`n` processes of `safeguard-bot run --once ARGS` started together; each one's pid, exit
    code, seconds, JSON result (None if its output was not JSON) and stderr file."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        with (logs / f"{tag}-{i}.out").open("w") as out, \
                (logs / f"{tag}-{i}.err").open("w") as err:
            procs.append((time.perf_counter(), subprocess.Popen(
                [str(CLI), "run", "--once", *args], env=env, stdout=out, stderr=err)))
    deadline = time.perf_counter() + ROUND_TIMEOUT_S
    runs = []
    for i, (started, p) in enumerate(procs):
        try:
            code = p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        text = (logs / f"{tag}-{i}.out").read_text()
        try:
            result = json.loads(text)
        except json.JSONDecodeError:
            result = None
        runs.append({"tag": f"{tag}-{i}", "pid": p.pid, "exit_code": code,
                     "seconds": round(time.perf_counter() - started, 1), "result": result,
                     "stdout": text[-2000:] if result is None else None,
                     "stderr": str(logs / f"{tag}-{i}.err")})
    return runs


def _ledger_entries(url: str) -> list:
    with Ledger(url, max_attempts=CHAOS_MAX_ATTEMPTS) as ledger:
        return ledger.entries()


def _pending(entries: list) -> list:
    """Entries a later run would still take: queued, or failed with attempts left."""
    return [e for e in entries if e.status == "queued"
            or (e.status == "failed" and e.attempts < CHAOS_MAX_ATTEMPTS)]


def _row(e) -> dict:
    """A ledger entry as the report shows it."""
    return {"revision": e.revision[:12], "status": e.status, "reason": e.reason,
            "attempts": e.attempts, "deferrals": e.deferrals, "worker": e.worker,
            "retry_at": e.retry_at.isoformat(timespec="seconds") if e.retry_at else None,
            "feed_pending": e.feed_pending is not None}


def _stderr_about(runs: list[dict], repo: str, limit: int = 40) -> list[str]:
    """Lines of the workers' stderr that mention `repo`, with the traceback lines after each."""
    lines = []
    for r in runs:
        text = Path(r["stderr"]).read_text(errors="replace").splitlines()
        for i, line in enumerate(text):
            if repo in line:
                lines.append(f"[{r['tag']}] {line}")
                follow = text[i + 1:i + 25]
                for more in follow:
                    if more.startswith(("  ", "Traceback", "During")) or re.match(
                            r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b", more):
                        lines.append(f"[{r['tag']}] {more}")
                    else:
                        break
    return lines[-limit:]


def chaos_grid(zoo_report: dict) -> list[float]:
    """The lambdas where this machine's zoo publishes each kind of fine-tune: the best point of
    its curve on the zoo's merge bars (bot/zoo/bars.py), as the tests pick it. Grid [0.5]
    publishes only some kinds on some machines, and chaos mode wants every candidate published."""
    from bot.zoo import bars

    models = zoo_report["models"]
    base, grid = models["zoo-base-it"], set()
    for folder, _ in KINDS:
        ft, key = models[folder], f"task_{models[folder]['task']}"
        grid.add(max(ft["curve"], key=lambda p, ft=ft, key=key:
                     bars.merge_slack(base, ft, p, key))["weight"])
    return sorted(grid)


def chaos(a: argparse.Namespace, log: RequestLog, zoo_report: dict) -> dict:
    """The chaos run (module docstring): seed, discover, drain in rounds under faults, one
    last run without faults, then check the ledger, the pull requests and the feed."""
    started = time.perf_counter()
    # the local hub's handler threads get deep stacks, in case it needs a deep recursion limit
    # to serve the nested config (see _survive_nested); the benchmark itself never recurses
    threading.stack_size(64 * 1024 * 1024)
    server = postgres_url(a.ledger_url)
    bot, token = CHAOS_BOT
    feed_repo = f"{bot}/day-results"
    with tempfile.TemporaryDirectory(prefix="day-chaos-") as tmp, \
            fresh_schema(server, a.keep_ledger) as (ledger_url, schema):
        root = Path(tmp)
        hub = LocalHub(root / "hub").start(port=0)
        try:
            for name, tok, *orgs in (BASE_OWNER, FT_OWNER):
                hub.add_user(name, tok, orgs=orgs)
            hub.add_user(bot, token)
            with pointed_at(hub.url, FT_OWNER[1]):
                t = time.perf_counter()
                tasks = seed(hub, a.zoo, a.candidates, decoys=False)
                expected_skips = seed_decoys(HfApi(endpoint=hub.url, token=FT_OWNER[1]),
                                             a.zoo, BASE, FT_OWNER[0], 6_000_000)
                well_formed = sorted(tasks)
                tasks.update(seed_hostile(HfApi(endpoint=hub.url, token=FT_OWNER[1]), a.zoo))
                seed_s = time.perf_counter() - t
                hub_bug = _survive_nested(hub, FT_OWNER[1])
                opted_in = {repo for i, repo in enumerate(well_formed)
                            if i % OPT_IN_EVERY == 0}
                grid = chaos_grid(zoo_report)
                out = _chaos_day(a, hub, log, root, ledger_url, tasks, well_formed,
                                 expected_skips, opted_in, feed_repo, grid)
        finally:
            hub.stop()
    out.update(seed_s=round(seed_s, 1), total_s=round(time.perf_counter() - started, 1),
               ledger={"server": _hide_password(server), "schema": schema,
                       "kept": a.keep_ledger},
               local_hub_bug=hub_bug)
    return out


def _hide_password(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


def _chaos_day(a: argparse.Namespace, hub: LocalHub, log: RequestLog, root: Path,
               ledger_url: str, tasks: dict[str, str], well_formed: list[str],
               expected_skips: dict[str, str], opted_in: set[str], feed_repo: str,
               grid: list[float]) -> dict:
    bot, token = CHAOS_BOT
    work, logs = root / "work", root / "logs"
    env = _bot_env(hub, token, root / "hf-cache", a.threads)
    args = _bot_args(work, tasks, feed_repo, [f"ledger.url={ledger_url}", *CHAOS_SETTINGS,
                                              f"sweep.grid={json.dumps(grid)}"])
    faults = [hub.add_fault(f) for f in chaos_faults(feed_repo, a.workers, a.pr_commit_hang)]
    began = time.perf_counter()

    # discovery (again, if the listing failed before the fine-tune to delete was recorded)
    discoveries = []
    for i in range(3):
        log.phase = "chaos-discovery"
        discoveries += _spawn(1, ["--discover-only", *args], env, logs, f"discovery{i}")
        if any(e.repo == GONE for e in _ledger_entries(ledger_url)):
            break
    found = discoveries[0]["result"] or {}
    # the fine-tune the owner deletes now: queued in the ledger, gone from the Hub
    owner = HfApi(endpoint=hub.url, token=FT_OWNER[1])
    with suppress(RepositoryNotFoundError):  # a try that failed yet landed, then retried
        _with_retries(lambda: owner.delete_repo(GONE), f"deleting {GONE}")

    runs: list[dict] = []
    rounds: list[dict] = []
    cap_hit = True
    for r in range(1, a.max_rounds + 1):
        log.phase = f"chaos-round-{r}"
        t = time.perf_counter()
        done = _spawn(a.workers, args, env, logs, f"round{r}")
        runs += done
        entries = _ledger_entries(ledger_url)
        pending = _pending(entries)
        known = {e.repo for e in entries}
        unseen = sorted((set(tasks) | set(expected_skips)) - known - {GONE})
        rounds.append({"round": r, "wall_s": round(time.perf_counter() - t, 1),
                       "exit_codes": [x["exit_code"] for x in done],
                       "statuses": dict(Counter(e.status for e in entries)),
                       "pending": len(pending), "not_in_ledger": len(unseen),
                       "deferrals": sum(e.deferrals for e in entries),
                       "feed_pending": sum(1 for e in entries if e.feed_pending is not None)})
        if not pending and not unseen:
            cap_hit = False
            break
        if r < a.max_rounds:
            due = [e.retry_at.timestamp() for e in pending if e.retry_at is not None]
            wait = min(due) - time.time() if due and len(due) == len(pending) else 0.0
            time.sleep(min(MAX_WAIT_BETWEEN_ROUNDS_S, max(0.0, wait) + 0.3))
    drain_s = time.perf_counter() - began

    # one more run with the faults cleared: pending feed records go out
    before_final = _ledger_entries(ledger_url)
    feed_pending_before = sum(1 for e in before_final if e.feed_pending is not None)
    injected = [{"fault": str(f), "matched": f.matched, "injected": f.injected}
                for f in faults]
    hub.clear_faults()
    log.phase = "chaos-final"
    final = _spawn(1, args, env, logs, "final")
    runs += final
    wall = time.perf_counter() - began
    log.phase = "verify"
    return _verify(hub, ledger_url, root, feed_repo, well_formed, expected_skips, opted_in,
                   discoveries, runs, rounds, final, cap_hit, injected, feed_pending_before,
                   found, a, log, grid, {"wall_s": round(wall, 1), "drain_s": round(drain_s, 1)})


def _verify(hub: LocalHub, ledger_url: str, root: Path, feed_repo: str, well_formed: list[str],
            expected_skips: dict[str, str], opted_in: set[str], discoveries: list[dict],
            runs: list[dict], rounds: list[dict], final: list[dict], cap_hit: bool,
            injected: list[dict], feed_pending_before: int, found: dict,
            a: argparse.Namespace, log: RequestLog, grid: list[float], times: dict) -> dict:
    bot, token = CHAOS_BOT
    entries = _ledger_entries(ledger_url)
    by_repo = {e.repo: e for e in entries}
    api = HfApi(endpoint=hub.url, token=token)

    # the feed on the hub: one record per candidate per decision
    try:
        feed_lines = Path(hf_hub_download(feed_repo, "results.jsonl", repo_type="dataset",
                                          endpoint=hub.url, token=token,
                                          cache_dir=root / "verify")).read_text().splitlines()
    except (EntryNotFoundError, HfHubHTTPError):
        feed_lines = []
    records = Counter((r["repo"], r["revision"], r["decision"])
                      for r in map(json.loads, filter(str.strip, feed_lines)))
    decisions = {}
    for repo, revision, decision in records:
        decisions.setdefault((repo, revision), set()).add(decision)
    feed_duplicates = {f"{repo}@{rev[:8]}:{d}": n for (repo, rev, d), n in records.items()
                       if n > 1}
    feed_lost = {}
    for e in entries:
        have = decisions.get(e.key, set())
        if e.status == "published" and not have & {"pull-request", "variant"}:
            feed_lost[e.repo] = f"published, no pull-request/variant record (has {sorted(have)})"
        elif e.status == "failed" and "failed" not in have:
            feed_lost[e.repo] = f"failed, no failed record (has {sorted(have)})"
        elif e.feed_pending is not None:
            feed_lost[e.repo] = "its record is still pending in the ledger"

    # the bot's pull requests: exactly one per published opted-in revision, none twice
    prs = {}
    for repo in sorted(opted_in):
        e = by_repo.get(repo)
        if e is None:
            continue
        marker = f"@{e.revision[:8]}"
        found_prs = [d for d in api.get_repo_discussions(
            repo, author=bot, discussion_type="pull_request") if marker in d.title]
        prs[repo] = {"status": e.status, "pull_requests": len(found_prs),
                     "links": e.links,
                     "ledger": _row(e) if len(found_prs) != 1 else None,
                     "found": [{"num": d.num, "title": d.title, "status": d.status,
                                "created_at": d.created_at.isoformat()}
                               for d in found_prs] if len(found_prs) != 1 else None}
    duplicate_prs = {r: p["pull_requests"] for r, p in prs.items() if p["pull_requests"] > 1}
    missing_prs = {r: p["pull_requests"] for r, p in prs.items()
                   if p["status"] == "published" and p["pull_requests"] == 0}
    variant_commits = {}
    for e in entries:
        if e.status == "published" and e.repo not in opted_in:
            variant = variant_name(bot, e.repo, "apache-2.0")
            try:
                n = sum(1 for c in api.list_repo_commits(variant)
                        if f"@{e.revision[:8]}" in c.title)
            except HfHubHTTPError:
                n = 0
            variant_commits[e.repo] = n

    # double claims: a candidate taken to publication twice
    outputs = [p for r in runs if r["result"] for p in r["result"]["processed"]]
    published_outputs = Counter((p["repo"], p["revision"]) for p in outputs
                                if p.get("status") == "published")
    double = {
        "published_attempts_over_1": {e.repo: e.attempts for e in entries
                                      if e.status == "published" and e.attempts > 1},
        "published_in_two_outputs": {f"{repo}@{rev[:8]}": n for (repo, rev), n
                                     in published_outputs.items() if n > 1}}

    crashed = [{"run": r["tag"], "exit_code": r["exit_code"],
                "output": r["stdout"], "stderr_tail": Path(r["stderr"]).read_text(
                    errors="replace")[-3000:]}
               for r in [*discoveries, *runs] if r["exit_code"] != 0 or r["result"] is None]

    # outcomes
    published = sorted(e.repo for e in entries if e.status == "published")
    skipped: dict[str, list[str]] = {}
    for e in entries:
        if e.status == "skipped":
            skipped.setdefault(e.reason.replace(e.repo, "{repo}"), []).append(e.repo)
    failed = {e.repo: _row(e) for e in entries if e.status == "failed"}
    waiting = {e.repo: _row(e) for e in _pending(entries)}
    running = {e.repo: _row(e) for e in entries if e.status == "running"}

    unexpected = {}
    for repo in well_formed:
        e = by_repo.get(repo)
        if e is None or e.status != "published":
            unexpected[repo] = {"expected": "published",
                                "ledger": _row(e) if e else "not in the ledger"}
    hostile = {}
    for name, (what, _, status, word) in HOSTILE.items():
        repo = f"{FT_OWNER[0]}/{name}"
        e = by_repo.get(repo)
        ok = e is not None and e.status == status and word.lower() in e.reason.lower() \
            and "\n" not in e.reason \
            and (status != "failed" or e.attempts >= CHAOS_MAX_ATTEMPTS)
        hostile[repo] = {"what": what, "expected": f"{status} ({word})", "ok": ok,
                         "ledger": _row(e) if e else "not in the ledger"}
        if not ok:
            unexpected[repo] = {"expected": f"{status}, reason with {word!r}, one line",
                                "ledger": hostile[repo]["ledger"]}
    for repo, word in expected_skips.items():
        e = by_repo.get(repo)
        if e is None or e.status != "skipped" or word.lower() not in e.reason.lower():
            unexpected[repo] = {"expected": f"skipped ({word})",
                                "ledger": _row(e) if e else "not in the ledger"}
    for repo, item in unexpected.items():
        item["stderr"] = _stderr_about([*discoveries, *runs], repo)

    missed = []
    if unexpected:
        missed.append(f"{len(unexpected)} repo(s) did not end as expected: "
                      f"{', '.join(sorted(unexpected))}")
    checks = [("duplicate pull requests", duplicate_prs), ("published without its "
              "pull request", missing_prs), ("duplicate feed records", feed_duplicates),
              ("lost feed records", feed_lost),
              ("published with ledger attempts > 1", double["published_attempts_over_1"]),
              ("published in two workers' outputs", double["published_in_two_outputs"]),
              ("entries left running", running), ("entries still waiting to be retried",
                                                   waiting), ("crashed runs", crashed)]
    missed += [f"{len(v)} {name}" for name, v in checks if v]
    if cap_hit:
        missed.append(f"the round cap ({a.max_rounds}) was hit before the ledger drained")
    requests = [x for phase in ("chaos-discovery", *(f"chaos-round-{r['round']}"
                                                      for r in rounds))
                for x in log.of(phase)]
    return {
        "mode": "chaos", "candidates": len(well_formed), "workers": a.workers,
        "grid": grid, "settings": list(CHAOS_SETTINGS),
        "threads_per_worker": a.threads, "cores": os.cpu_count(),
        "goal_met": not missed, "goal_missed": missed,
        **times, "rounds": len(rounds), "round_cap": a.max_rounds, "round_cap_hit": cap_hit,
        "per_round": rounds,
        "discovery": {"candidates": len(found.get("candidates", [])),
                      "skips": len(found.get("skips", [])),
                      "later": [x["repo"] for x in found.get("later", [])],
                      "errors": found.get("errors", []), "runs": len(discoveries)},
        "outcomes": {"published": len(published), "published_repos": published,
                     "skipped_by_reason": skipped, "failed": failed,
                     "deferred_still_waiting": waiting, "left_running": running,
                     "deferrals_in_all": sum(e.deferrals for e in entries)},
        "well_formed_not_published": sorted(r for r in unexpected if r in well_formed),
        "hostile": hostile, "unexpected": unexpected,
        "double_claims": double,
        "pull_requests": {"per_repo": prs, "duplicates": duplicate_prs,
                          "missing": missing_prs},
        "variant_commits_over_1": {r: n for r, n in variant_commits.items() if n > 1},
        "feed": {"records": sum(records.values()), "duplicates": feed_duplicates,
                 "lost": feed_lost, "pending_before_final_run": feed_pending_before},
        "faults": injected,
        "faults_injected": sum(f["injected"] for f in injected),
        "hub_requests_under_faults": len(requests),
        "hub_error_answers_under_faults": dict(sorted(Counter(
            s for _, _, s in requests if s == 429 or s >= 500).items())),
        "crashed_runs": crashed,
        "exit_codes": {r["tag"]: r["exit_code"] for r in [*discoveries, *runs]},
        "final_run": {"exit_code": final[0]["exit_code"],
                      "processed": len((final[0]["result"] or {}).get("processed", []))},
    }


def print_chaos(out: dict) -> None:
    """The chaos report for a person."""
    o = out["outcomes"]
    print(f"day_bench --chaos: {out['candidates']} fine-tunes + 6 decoys + "
          f"{len(HOSTILE)} hostile repos on the local hub, {out['workers']} workers on "
          f"PostgreSQL (schema {out['ledger']['schema']}), {out['cores']} cores, grid "
          f"{out['grid']}; seeding {out['seed_s']} s")
    print(f"  settings: {' '.join(out['settings'])}")
    if out["local_hub_bug"]:
        print(f"  LOCAL HUB BUG (worked around): the nested config.json made the hub answer "
              f"500: {out['local_hub_bug']}")
    print(f"faults: {out['faults_injected']} injected in {out['hub_requests_under_faults']} "
          f"logged requests; hub error answers {out['hub_error_answers_under_faults']}")
    for f in out["faults"]:
        print(f"  {f['injected']:>4} of {f['matched']:>5}  {f['fault']}")
    d = out["discovery"]
    print(f"discovery: {d['candidates']} candidates, {d['skips']} skips, later {d['later']}, "
          f"errors {d['errors']} ({d['runs']} run(s))")
    for r in out["per_round"]:
        print(f"round {r['round']}: {r['wall_s']} s, exit codes {r['exit_codes']}, ledger "
              f"{r['statuses']}, pending {r['pending']}, not in ledger {r['not_in_ledger']}, "
              f"deferrals so far {r['deferrals']}, feed records pending {r['feed_pending']}")
    print(f"final run (no faults): exit {out['final_run']['exit_code']}, processed "
          f"{out['final_run']['processed']}")
    print(f"published {o['published']} of {out['candidates']} well-formed; deferrals in all "
          f"{o['deferrals_in_all']}")
    for reason, repos in o["skipped_by_reason"].items():
        print(f"  skipped {len(repos)}: {reason}  [{', '.join(repos)}]")
    for repo, row in o["failed"].items():
        print(f"  failed: {repo} (attempts {row['attempts']}): {row['reason']}")
    for repo, row in o["deferred_still_waiting"].items():
        print(f"  still waiting: {repo} ({row['status']}): {row['reason']}")
    for repo, row in o["left_running"].items():
        print(f"  LEFT RUNNING: {repo} (worker {row['worker']})")
    dc = out["double_claims"]
    pr, feed = out["pull_requests"], out["feed"]
    print(f"double claims: {len(dc['published_attempts_over_1'])} (published, ledger attempts "
          f"> 1) / {len(dc['published_in_two_outputs'])} (published in two outputs)")
    print(f"pull requests: {sum(p['pull_requests'] for p in pr['per_repo'].values())} for "
          f"{len(pr['per_repo'])} opted-in repos; duplicates {pr['duplicates']}, missing "
          f"{pr['missing']}; variant commits over 1: {out['variant_commits_over_1']}")
    for repo in (*pr["duplicates"], *pr["missing"]):
        p = pr["per_repo"][repo]
        print(f"  {repo}: ledger {p['ledger']}, links {p['links']}; the bot's pull "
              f"requests for the revision: {p['found']}")
    print(f"feed: {feed['records']} records, duplicates {feed['duplicates']}, lost "
          f"{feed['lost']}, pending before the final run {feed['pending_before_final_run']}")
    for repo, item in out["unexpected"].items():
        print(f"  UNEXPECTED {repo}: expected {item['expected']}; ledger {item['ledger']}")
        for line in item["stderr"][-12:]:
            print(f"    {line}")
    for c in out["crashed_runs"]:
        print(f"  CRASHED {c['run']} (exit {c['exit_code']}): "
              f"{c['stderr_tail'].strip().splitlines()[-1:] or c['output']}")
    print(f"wall {out['wall_s']} s (discovery + {out['rounds']} round(s) + final run; cap "
          f"{out['round_cap']}{', HIT' if out['round_cap_hit'] else ''}); total "
          f"{out['total_s']} s")
    if out["goal_met"]:
        print("GOAL MET: every well-formed candidate published, hostile repos ended as "
              "expected, 0 duplicates, 0 lost, 0 left running")
    else:
        print("GOAL MISSED: " + "; ".join(out["goal_missed"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".cache" / "zoo")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--chaos", action="store_true",
                        help="the day on PostgreSQL under injected Hub faults, with hostile "
                             "repos (exit 1 if the goal is missed)")
    parser.add_argument("--ledger-url", help="--chaos: the PostgreSQL server (default: the "
                                             "one `scripts/postgres start` gives)")
    parser.add_argument("--max-rounds", type=int, default=10,
                        help="--chaos: rounds of workers at most")
    parser.add_argument("--keep-ledger", action="store_true",
                        help="--chaos: keep the run's schema (else dropped at the end)")
    parser.add_argument("--pr-commit-hang", action="store_true",
                        help="--chaos: also stall the first pull-request commit past the "
                             "workers' read timeout (it lands after they gave up on it)")
    a = parser.parse_args()
    if min(a.candidates, a.workers, a.threads, a.max_rounds) < 1:
        parser.error("--candidates, --workers, --threads and --max-rounds must be at least 1")
    started = time.perf_counter()
    zoo_report = build_zoo(a.zoo)  # cached by its recipe's hash
    disable_progress_bars()
    log = RequestLog()
    hub_log = logging.getLogger("bot.localhub")
    hub_log.setLevel(logging.DEBUG)
    hub_log.addHandler(log)
    hub_log.propagate = False
    if a.chaos:
        out = chaos(a, log, zoo_report)
        if a.json:
            print(json.dumps(out, indent=2))
        else:
            print_chaos(out)
        sys.exit(0 if out["goal_met"] else 1)
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
