"""Ledger benchmark: how fast N processes drain one queue, on SQLite and on PostgreSQL.

For each backend and each process count, a fresh ledger gets --entries queued entries; the
processes start together and loop claim (+ finish as published, unless --claim-only) until the
queue is empty. Reported: claims per second (entries / wall time from the start signal to the
last process done) and that no entry was claimed twice. PostgreSQL runs when
SAFEGUARD_TEST_POSTGRES_URL is set (`scripts/postgres start` prints one).

    python benchmarks/ledger_bench.py [--entries 500] [--processes 1,4] [--claim-only] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from bot.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
WORKER = """
import json, os, sys, time
from bot.ledger import Ledger
url, name, go, finish = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
ledger = Ledger(url)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
got = []
while (entry := ledger.claim(name)) is not None:
    got.append(entry.repo)
    if finish:
        ledger.finish(entry, "published")
print(json.dumps({"got": got, "end": time.time()}))
"""


def drain(url: str, entries: int, processes: int, finish: bool, workdir: Path) -> dict:
    """Queue `entries`, let `processes` claim them all; claims per second and double claims."""
    with Ledger(url) as ledger:
        for i in range(entries):
            ledger.enqueue(f"org/ft-{i:05d}", "main")
    go = workdir / f"go-{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", WORKER, url, f"w{n}", str(go),
                                  "1" if finish else "0"],
                                 env=env, text=True, stdout=subprocess.PIPE)
                for n in range(processes)]
    for child in children:
        assert child.stdout.readline() == "ready\n"
    start = time.time()
    go.touch()
    results = [json.loads(child.communicate()[0]) for child in children]
    seconds = max(r["end"] for r in results) - start
    claimed = [repo for r in results for repo in r["got"]]
    return {"processes": processes, "entries": entries, "seconds": round(seconds, 3),
            "claims_per_s": round(entries / seconds, 1),
            "double_claims": len(claimed) - len(set(claimed)),
            "unclaimed": entries - len(set(claimed)),
            "per_process": [len(r["got"]) for r in results]}


def postgres_schema(server: str) -> tuple[str, sa.Engine, str]:
    """A fresh schema on the server, and the URL that uses it."""
    base = sa.make_url(server)
    if base.drivername in ("postgresql", "postgres"):
        base = base.set(drivername="postgresql+psycopg")
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), engine, schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--processes", default="1,4")
    parser.add_argument("--claim-only", action="store_true", help="claim without finishing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in counts:
            url = str(work / f"sqlite-{n}.sqlite")
            rows.append({"backend": "sqlite",
                         **drain(url, args.entries, n, not args.claim_only, work)})
        server = os.environ.get("SAFEGUARD_TEST_POSTGRES_URL")
        for n in counts if server else []:
            url, engine, schema = postgres_schema(server)
            try:
                rows.append({"backend": "postgresql",
                             **drain(url, args.entries, n, not args.claim_only, work)})
            finally:
                with engine.begin() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
                engine.dispose()
    mode = "claim" if args.claim_only else "claim+finish"
    if args.json:
        print(json.dumps({"mode": mode, "runs": rows}))
        return
    print(f"mode: {mode}; {os.cpu_count()} CPUs")
    print(f"{'backend':<11} {'procs':>5} {'claims/s':>9} {'seconds':>8} {'double':>6}  per process")
    for r in rows:
        print(f"{r['backend']:<11} {r['processes']:>5} {r['claims_per_s']:>9} "
              f"{r['seconds']:>8} {r['double_claims']:>6}  {r['per_process']}")
    if not os.environ.get("SAFEGUARD_TEST_POSTGRES_URL"):
        print("(PostgreSQL skipped: set SAFEGUARD_TEST_POSTGRES_URL)")


if __name__ == "__main__":
    main()
