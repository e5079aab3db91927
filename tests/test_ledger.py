"""The ledger on SQLite and on a real PostgreSQL server: idempotence, claims, skips, retries,
leases, a process killed mid-run, and real processes racing to claim one queue."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.errors import LedgerError, UsageError
from bot.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "SAFEGUARD_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty ledger location: a SQLite file, or a new schema on the PostgreSQL server
    named by SAFEGUARD_TEST_POSTGRES_URL (dropped afterwards)."""
    if request.param == "sqlite":
        yield str(tmp_path / "work" / "ledger.sqlite")
        return
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (`scripts/postgres start` "
                    "starts one on loopback and prints the URL)")
    pytest.importorskip("psycopg", reason="PostgreSQL ledger tests need psycopg")
    base = sa.make_url(server)
    if base.drivername in ("postgresql", "postgres"):
        base = base.set(drivername="postgresql+psycopg")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def ledger(url):
    with Ledger(url) as opened:
        yield opened


def test_enqueue_is_idempotent(ledger):
    assert ledger.seen("org/ft", "abc") is None
    assert ledger.enqueue("org/ft", "abc", kind="adapter", base="org/base") is True
    assert ledger.enqueue("org/ft", "abc") is False
    assert ledger.enqueue("org/ft", "def") is True
    first = ledger.seen("org/ft", "abc")
    assert (first.status, first.kind, first.base, first.attempts) == (
        "queued", "adapter", "org/base", 0)

    entry = ledger.claim("w1", "org/ft", "abc")
    ledger.finish(entry, "published")
    assert ledger.enqueue("org/ft", "abc") is False  # processed once: never queued again
    done = ledger.seen("org/ft", "abc")
    assert (done.status, done.kind, done.attempts) == ("published", "adapter", 1)
    assert [e.revision for e in ledger.entries()] == ["abc", "def"]


def test_claim_finish_lifecycle(ledger, url):
    ledger.enqueue("org/a", "1", base="org/base")
    ledger.enqueue("org/b", "1")
    entry = ledger.claim("w1")
    assert (entry.repo, entry.status, entry.worker, entry.attempts) == ("org/a", "running",
                                                                       "w1", 1)
    assert entry.claimed_at is not None and entry.expires_at > entry.claimed_at
    assert ledger.claim("w2").repo == "org/b"
    assert ledger.claim("w3") is None

    ledger.heartbeat(entry)
    selection = {"weight": 0.6, "asr": 0.12, "grid": [0.2, 0.4]}
    links = {"variant": "bot/org-a-safeguarded", "pr": None}
    ledger.finish(entry, "published", "best trade-off at 0.6", selection, links)
    with Ledger(url) as other:  # a second process's view
        done = other.seen("org/a", "1")
    assert (done.status, done.reason, done.worker, done.base) == (
        "published", "best trade-off at 0.6", "w1", "org/base")
    assert done.selection == selection and done.links == links
    assert done.created_at <= done.updated_at
    assert [e.repo for e in ledger.entries("published")] == ["org/a"]
    assert [e.repo for e in ledger.entries("running")] == ["org/b"]
    with pytest.raises(LedgerError, match="lost its claim"):
        ledger.finish(entry, "failed", "twice")  # the claim has ended
    assert ledger.seen("org/a", "1").status == "published"


def test_claim_a_named_entry(ledger):
    ledger.enqueue("org/old", "1")
    ledger.enqueue("org/new", "1")
    assert ledger.claim("w", "org/new", "1").repo == "org/new"
    assert ledger.claim("w", "org/new", "1") is None  # running already
    assert ledger.claim("w", "org/unknown", "1") is None
    with pytest.raises(UsageError, match="both repo and revision"):
        ledger.claim("w", "org/old")


def test_skip_records_a_reason(ledger):
    ledger.skip("org/ft", "1", "no safetensors weights", kind="adapter", base="org/base")
    entry = ledger.seen("org/ft", "1")
    assert (entry.status, entry.reason, entry.kind, entry.attempts) == (
        "skipped", "no safetensors weights", "adapter", 0)
    assert ledger.enqueue("org/ft", "1") is False
    assert ledger.claim("w") is None

    ledger.enqueue("org/queued", "1")
    ledger.skip("org/queued", "1", "base not watched any more")
    assert ledger.seen("org/queued", "1").status == "skipped"

    ledger.enqueue("org/done", "1")
    ledger.finish(ledger.claim("w"), "published")
    ledger.skip("org/done", "1", "too late")  # an outcome once recorded is kept
    assert ledger.seen("org/done", "1").status == "published"


def test_fail_retries_up_to_max_attempts(url):
    with Ledger(url, max_attempts=3, retry_seconds=0) as ledger:
        ledger.enqueue("org/ft", "1")
        for attempt in (1, 2):
            entry = ledger.claim(f"w{attempt}")
            assert entry.attempts == attempt
            ledger.fail(entry, f"timeout {attempt}")
            failed = ledger.seen("org/ft", "1")
            assert (failed.status, failed.reason) == ("failed", f"timeout {attempt}")
        entry = ledger.claim("w3")
        assert (entry.attempts, entry.reason) == (3, "timeout 2")  # the last attempt's outcome
        ledger.fail(entry, "out of memory")
        assert ledger.claim("w4") is None
        final = ledger.seen("org/ft", "1")
        assert (final.status, final.attempts) == ("failed", 3)
        assert final.reason == "gave up after 3 attempts: out of memory"
    with Ledger(url, max_attempts=4, retry_seconds=0) as patient:  # one more with a higher limit
        assert patient.claim("w5").attempts == 4


def test_a_failure_waits_longer_after_each_attempt(url):
    wait = 0.4  # margins for a busy machine: each check is well inside or past a wait
    with Ledger(url, max_attempts=3, retry_seconds=wait) as ledger:
        ledger.enqueue("org/ft", "1")
        for attempt in (1, 2):
            entry = ledger.claim("w")
            ledger.fail(entry, "boom")
            failed = ledger.seen("org/ft", "1")
            waited = (failed.retry_at - failed.updated_at).total_seconds()
            assert waited == pytest.approx(wait * 2 ** (attempt - 1), abs=0.05)
            assert ledger.claim("w") is None and ledger.claimable() == []
            time.sleep(waited + 0.1)
        assert ledger.claim("w").attempts == 3


def test_a_deferral_waits_and_uses_no_attempt(url):
    with Ledger(url, max_attempts=1, retry_seconds=0.3) as ledger:
        assert ledger.enqueue("org/new", "1", later="the Hub answered 503")
        first = ledger.seen("org/new", "1")
        assert (first.status, first.deferrals, first.attempts) == ("queued", 1, 0)
        assert ledger.claim("w") is None  # not before its retry time
        time.sleep(0.4)
        entry = ledger.claim("w")
        for n in (2, 3):  # an outage longer than max_attempts claims: never a decision
            ledger.defer(entry, "the Hub answered 429")
            back = ledger.seen("org/new", "1")
            assert (back.status, back.attempts, back.deferrals) == ("queued", 0, n)
            assert back.reason == "waiting to try again: the Hub answered 429"
            assert (back.retry_at - back.updated_at).total_seconds() == \
                pytest.approx(0.3 * 2 ** (n - 1), abs=0.05)
            time.sleep(0.3 * 2 ** (n - 1) + 0.1)
            entry = ledger.claim("w")
            assert entry.attempts == 1
        ledger.finish(entry, "published")
        assert ledger.seen("org/new", "1").retry_at is None


def test_release_worker_frees_what_a_stopping_process_holds(ledger):
    for name in ("a", "b", "c"):
        ledger.enqueue(f"org/{name}", "1")
    mine, theirs = ledger.claim("me"), ledger.claim("other")
    assert ledger.release_worker("me", "stopped while a Hub call hung") == 1
    back = ledger.seen(*mine.key)
    assert (back.status, back.attempts) == ("queued", 0)
    assert back.reason == "released by me: stopped while a Hub call hung"
    assert ledger.seen(*theirs.key).status == "running"
    with pytest.raises(LedgerError):
        ledger.finish(mine, "published")  # that claim is over


def test_a_feed_record_waits_in_the_ledger_until_it_is_sent(ledger):
    ledger.enqueue("org/a", "1")
    ledger.enqueue("org/b", "1")
    ledger.finish(ledger.claim("w"), "published", feed='{"repo": "org/a"}')
    ledger.fail(ledger.claim("w"), "boom", feed='{"repo": "org/b"}')
    pending = ledger.feed_pending()
    assert [(e.repo, e.status, e.feed_pending) for e in pending] == [
        ("org/a", "published", '{"repo": "org/a"}'), ("org/b", "failed", '{"repo": "org/b"}')]
    ledger.feed_sent(pending[:1])
    assert [e.repo for e in ledger.feed_pending()] == ["org/b"]


def test_a_ledger_of_an_earlier_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # the table as the first release made it
        conn.exec_driver_sql(
            "CREATE TABLE ledger_entries (repo VARCHAR NOT NULL, revision VARCHAR NOT NULL, "
            "kind VARCHAR NOT NULL, base VARCHAR, status VARCHAR NOT NULL, reason TEXT NOT NULL,"
            " selection TEXT, links TEXT, attempts INTEGER NOT NULL, worker VARCHAR, "
            "token VARCHAR, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, "
            "claimed_at DATETIME, expires_at DATETIME, PRIMARY KEY (repo, revision))")
        conn.exec_driver_sql(
            "INSERT INTO ledger_entries VALUES ('org/old', '1', 'model', NULL, 'failed', 'x', "
            "NULL, NULL, 1, 'w', NULL, '2026-01-01 00:00:00', '2026-01-01 00:00:00', NULL, "
            "NULL)")
    engine.dispose()
    with Ledger(path, retry_seconds=0) as ledger:
        old = ledger.seen("org/old", "1")
        assert (old.status, old.deferrals, old.retry_at, old.feed_pending) == \
            ("failed", 0, None, None)
        assert ledger.claim("w").key == ("org/old", "1")


def test_release_does_not_count_an_attempt(ledger):
    ledger.enqueue("org/ft", "1")
    entry = ledger.claim("w1")
    ledger.release(entry, "SIGTERM")
    back = ledger.seen("org/ft", "1")
    assert (back.status, back.attempts, back.reason) == ("queued", 0, "released by w1: SIGTERM")
    assert ledger.claim("w2").attempts == 1
    with pytest.raises(LedgerError):
        ledger.release(entry, "again")  # that claim is over


def test_lease_expiry_makes_a_claim_claimable_again(url):
    with Ledger(url, lease_seconds=1.0) as ledger:  # margins for a busy machine
        ledger.enqueue("org/ft", "1")
        stale = ledger.claim("w1")
        assert ledger.claim("w2") is None
        time.sleep(1.1)
        fresh = ledger.claim("w2")
        assert (fresh.worker, fresh.attempts) == ("w2", 2)
        assert fresh.reason.startswith("the claim by w1 expired at ")
        for late in (ledger.heartbeat, lambda e: ledger.finish(e, "published")):
            with pytest.raises(LedgerError, match="w1 lost its claim on org/ft@1: it is running "
                                                  r"\(worker w2, attempt 2\)"):
                late(stale)
        ledger.finish(fresh, "published")
        assert ledger.seen("org/ft", "1").worker == "w2"


def test_heartbeat_extends_the_lease(url):
    with Ledger(url, lease_seconds=1.0) as ledger:
        ledger.enqueue("org/ft", "1")
        entry = ledger.claim("w1")
        time.sleep(1.1)  # expired, but nobody has taken it: the heartbeat still holds it
        ledger.heartbeat(entry)
        assert ledger.seen("org/ft", "1").expires_at > entry.expires_at
        assert ledger.claim("w2") is None


def test_expired_claim_without_attempts_left_gives_up(url):
    with Ledger(url, max_attempts=1, lease_seconds=0.2) as ledger:
        ledger.enqueue("org/ft", "1")
        entry = ledger.claim("w1")
        time.sleep(0.3)
        assert ledger.claim("w2") is None
        final = ledger.seen("org/ft", "1")
        assert final.status == "failed"
        assert final.reason == ("gave up after 1 attempts: the claim by w1 expired "
                                "(process killed?)")
        with pytest.raises(LedgerError, match="it is failed"):
            ledger.heartbeat(entry)


def test_bad_arguments(ledger, tmp_path):
    with pytest.raises(UsageError, match="unknown ledger status 'done'"):
        ledger.entries("done")
    with pytest.raises(UsageError, match="unknown ledger kind"):
        ledger.enqueue("org/ft", "1", kind="dataset")
    ledger.enqueue("org/ft", "1")
    entry = ledger.claim("w")
    with pytest.raises(UsageError, match="finish takes one of"):
        ledger.finish(entry, "queued")
    with pytest.raises(UsageError, match="not a claimed entry"):
        ledger.heartbeat(dataclasses.replace(entry, token=None))
    with pytest.raises(UsageError, match="max_attempts"):
        Ledger(tmp_path / "x.sqlite", max_attempts=0)
    with pytest.raises(UsageError, match="SQLite or PostgreSQL"):
        Ledger("mysql://u@127.0.0.1/db")
    with pytest.raises(UsageError, match="give SQLite a file"):
        Ledger("sqlite://")


def test_a_directory_holds_ledger_sqlite(tmp_path):
    with Ledger(tmp_path) as ledger:
        ledger.enqueue("org/ft", "1")
    assert (tmp_path / "ledger.sqlite").is_file()
    with Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}") as same:
        assert same.seen("org/ft", "1").status == "queued"
        with same._engine.connect() as conn:  # WAL: readers never wait for the writer
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_unreachable_postgres_is_a_ledger_error():
    pytest.importorskip("psycopg", reason="needs psycopg")
    with pytest.raises(LedgerError, match="ledger database postgresql"):
        Ledger("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


CLAIM_AND_HANG = """
import sys, time
from bot.ledger import Ledger
ledger = Ledger(sys.argv[1], lease_seconds=float(sys.argv[2]))
entry = ledger.claim("doomed")
print(entry.repo, entry.revision, flush=True)
time.sleep(120)  # "processing", until SIGKILL
"""


def _child(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, **kwargs)


def test_the_ledger_survives_a_killed_process(url):
    with Ledger(url) as ledger:
        ledger.enqueue("org/ft", "1")
    child = _child("-c", CLAIM_AND_HANG, url, "2.0")  # a lease that outlasts the checks
    try:
        assert child.stdout.readline().split() == ["org/ft", "1"]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    with Ledger(url) as ledger:  # a new process's view
        orphan = ledger.seen("org/ft", "1")
        assert (orphan.status, orphan.worker, orphan.attempts) == ("running", "doomed", 1)
        assert ledger.claim("rescuer") is None  # its lease has not expired yet
        time.sleep(max(0.0, (orphan.expires_at.timestamp() - time.time())) + 0.1)
        rescued = ledger.claim("rescuer")
        assert (rescued.key, rescued.worker, rescued.attempts) == (("org/ft", "1"),
                                                                   "rescuer", 2)
        ledger.finish(rescued, "published")
        assert ledger.seen("org/ft", "1").status == "published"


CLAIM_ALL = """
import json, os, sys, time
from bot.ledger import Ledger
url, name, go = sys.argv[1:]
ledger = Ledger(url)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
got, start = [], time.perf_counter()
while (entry := ledger.claim(name)) is not None:
    got.append([entry.repo, entry.revision])
    ledger.finish(entry, "published", links={"by": name})
print(json.dumps({"got": got, "seconds": time.perf_counter() - start}))
"""


@pytest.mark.parametrize("workers", [4])
def test_never_double_claimed(url, tmp_path, workers):
    total = 50
    with Ledger(url) as ledger:
        for i in range(total):
            ledger.enqueue(f"org/ft-{i:02d}", "main")
    go = tmp_path / "go"
    children = [_child("-c", CLAIM_ALL, url, f"w{n}", str(go)) for n in range(workers)]
    for child in children:  # all imported and connected: start them together
        assert child.stdout.readline() == "ready\n"
    go.touch()
    results = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        results.append(json.loads(out))

    claimed = [tuple(key) for result in results for key in result["got"]]
    assert len(claimed) == len(set(claimed)) == total  # nobody twice, everybody once
    with Ledger(url) as ledger:
        done = ledger.entries("published")
        assert len(done) == total and {e.attempts for e in done} == {1}
        assert all(e.links == {"by": e.worker} for e in done)
    slowest = max(result["seconds"] for result in results)
    busy = sum(1 for result in results if result["got"])
    print(f"{total} claims+finishes by {workers} processes ({busy} got some) in {slowest:.2f} s")
