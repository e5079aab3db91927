"""Killing the process at any step leaves no partial publication and a retryable ledger.

One fine-tune of a seeded base on the local hub; `safeguard-bot run --once` as a real process,
SIGKILLed the moment it announces a step ("REPO: step NAME" on stderr). What the Hub holds then
must be nothing, an empty repo, or the whole publication; the ledger must hold the entry as
running, and once its lease (2 s here) runs out, a second run must finish it: published, one
commit with weights, one record in the feed.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from bot.ledger import Ledger
from bot.zoo.seed import card, upload

from conftest import sweet_spot

ROOT = Path(__file__).resolve().parent.parent
BASE = "killbase/zoo-base-it"
FINETUNE = "killcarol/zoo-ft-echo"
STEPS = ("sweep", "merge", "publish", "feed")
LEASE_S = 2
RUN_TIMEOUT_S = 240
# what a complete variant holds besides its weights
VARIANT_FILES = {"config.json", "README.md", "sweep.png", "tokenizer.json",
                 "tokenizer_config.json"}


@pytest.fixture(scope="module")
def seeded(localhub, zoo, tmp_path_factory):
    """The zoo's base under killbase, its echo fine-tune (not opted in) under killcarol."""
    directory, _ = zoo
    localhub.add_user("killbase", "hf_killbase_token")
    localhub.add_user("killcarol", "hf_killcarol_token")
    upload(HfApi(endpoint=localhub.url, token="hf_killbase_token"), BASE,
           directory / "zoo-base-it", card(None, ["safety-aligned"], title="zoo-base-it"))
    sha = upload(HfApi(endpoint=localhub.url, token="hf_killcarol_token"), FINETUNE,
                 directory / "zoo-ft-echo", card(BASE, ["fine-tune"], title="zoo-ft-echo"))
    return localhub, directory, sha, tmp_path_factory.mktemp("kill-hf-home")


class Bot:
    """One bot account with its own variant repo, feed dataset and work dir."""

    def __init__(self, seeded, name: str, workdir: Path) -> None:
        self.hub, directory, self.sha, hf_home = seeded
        self.name, self.token, self.workdir = name, f"hf_{name.replace('-', '_')}_token", workdir
        self.hub.add_user(name, self.token)
        self.variant = f"{name}/killcarol__zoo-ft-echo-safeguarded"
        self.feed_repo = f"{name}/kill-results"
        self.api = HfApi(endpoint=self.hub.url, token=self.token)
        # one torch thread: the tiny model gains nothing from two, and on a busy 2-core
        # machine two threads run the sweep about 3x slower
        self.env = {**os.environ, **self.hub.env(self.token), "HF_HOME": str(hf_home),
                    "OMP_NUM_THREADS": "1"}
        self.cache = workdir.parent / "reads"  # the test's own downloads
        task_files = {FINETUNE: str(directory / "prompts" / "echo_heldout.jsonl")}
        self.args = [
            sys.executable, "-m", "bot.cli", "run", "--once", "--workdir", str(workdir),
            "--config", str(ROOT / "bot" / "zoo" / "evaluate.toml"),
            "--set", f"watch.bases={BASE}",
            "--set", f"evaluate.task_files={json.dumps(task_files)}",
            "--set", "sweep.grid=[{}]".format(sweet_spot(
                json.loads((directory / "zoo.json").read_text()), "zoo-ft-echo")),
            "--set", "evaluate.limit=16",  # 16 prompts per set: the same decision, faster
            "--set", f"ledger.lease_seconds={LEASE_S}",
            "--set", f"publish.feed_repo={self.feed_repo}"]

    def run_until(self, step: str, before_kill=lambda proc: None) -> list[str]:
        """Start a run, SIGKILL it as soon as it announces `step`; its stderr lines."""
        proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, bufsize=1)
        watchdog = threading.Timer(RUN_TIMEOUT_S, proc.kill)
        watchdog.start()
        lines = []
        try:
            for line in proc.stderr:
                lines.append(line.rstrip("\n"))
                if re.search(rf"{re.escape(FINETUNE)}: step {step}$", lines[-1]):
                    before_kill(proc)
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait(timeout=30)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, \
            f"the run ended ({proc.returncode}) without announcing {step}:\n" + \
            "\n".join(lines[-40:])
        return lines

    def run(self) -> dict:
        out = subprocess.run([*self.args, "--json"], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    def ledger_entry(self):
        with Ledger(self.workdir / "ledger.sqlite") as ledger:
            return ledger.seen(FINETUNE, self.sha)

    def variant_state(self) -> tuple[str, list]:
        """'absent', 'empty' (created, no commit of ours) or 'complete', and the commits that
        carry weights; a partial publication fails the test."""
        try:
            files = set(self.api.list_repo_files(self.variant))
        except RepositoryNotFoundError:
            return "absent", []
        commits = self.api.list_repo_commits(self.variant)
        if files == {".gitattributes"}:
            assert len(commits) == 1, commits
            return "empty", []
        weights = {f for f in files if f.endswith(".safetensors")}
        if "model.safetensors.index.json" in files:
            index = json.loads(Path(hf_hub_download(
                self.variant, "model.safetensors.index.json", endpoint=self.hub.url,
                token=self.token, cache_dir=self.cache)).read_text())
            complete_weights = set(index["weight_map"].values()) <= weights
        else:
            complete_weights = weights == {"model.safetensors"}
        assert files >= VARIANT_FILES and complete_weights, f"partial publication: {files}"
        with_weights = [c for c in commits if self._touches_weights(c.commit_id)]
        return "complete", with_weights

    def _touches_weights(self, commit: str) -> bool:
        """Whether `commit` changed a weights file (against its parent)."""
        info = {f.path: f.blob_id for f in self.api.list_repo_tree(self.variant, revision=commit)}
        parents = [c.commit_id for c in self.api.list_repo_commits(self.variant, revision=commit)]
        before = {} if len(parents) < 2 else {
            f.path: f.blob_id for f in self.api.list_repo_tree(self.variant,
                                                                revision=parents[1])}
        return any(p.endswith(".safetensors") and before.get(p) != b for p, b in info.items())

    def feed_records(self) -> list[dict]:
        """The feed's records (every line must be whole JSON)."""
        try:
            head = self.api.repo_info(self.feed_repo, repo_type="dataset").sha
            path = hf_hub_download(self.feed_repo, "results.jsonl", repo_type="dataset",
                                   revision=head, endpoint=self.hub.url, token=self.token,
                                   cache_dir=self.cache)
        except (RepositoryNotFoundError, EntryNotFoundError):
            return []
        text = Path(path).read_text()
        assert text == "" or text.endswith("\n"), f"a partial line: {text[-200:]!r}"
        return [json.loads(line) for line in text.splitlines()]


def _wait_for_lease(entry) -> None:
    left = (entry.expires_at - datetime.now(UTC)).total_seconds()
    time.sleep(max(0.0, left) + 0.2)


def _check_retry(bot: Bot) -> list[dict]:
    """The second run finishes the entry: published, one commit with weights; the feed's
    records for the fine-tune (all for this revision, as a published variant)."""
    entry = bot.ledger_entry()
    _wait_for_lease(entry)
    result = bot.run()
    [done] = result["processed"]
    assert (done["repo"], done["status"], done["decision"]) == (FINETUNE, "published",
                                                                "variant"), done
    entry = bot.ledger_entry()
    assert entry.status == "published" and entry.attempts == 2, entry
    assert entry.links["variant"].endswith(bot.variant)
    state, with_weights = bot.variant_state()
    assert state == "complete" and len(with_weights) == 1, (state, with_weights)
    records = [r for r in bot.feed_records() if r["repo"] == FINETUNE]
    assert records and all(r["decision"] == "variant" and r["revision"] == bot.sha
                           for r in records), records
    return records


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_leaves_nothing_partial_and_a_retry_finishes(seeded, tmp_path, step):
    bot = Bot(seeded, f"kill-bot-{step}", tmp_path / "work")
    lines = bot.run_until(step)
    assert f"{FINETUNE}: step {step}" in lines[-1]

    # (a) nothing partial on the Hub
    state, with_weights = bot.variant_state()
    if step in ("sweep", "merge"):
        assert state == "absent", state  # nothing is published before the publish step
    elif step == "feed":
        assert state == "complete" and len(with_weights) == 1  # published, then killed
    records = bot.feed_records()  # whole lines, if any
    assert all(r["repo"] == FINETUNE for r in records)

    # (b) the ledger holds the killed claim; it is retryable after the lease
    entry = bot.ledger_entry()
    assert (entry.status, entry.attempts) == ("running", 1), entry
    records = _check_retry(bot)
    assert len(records) == 1, records


def test_a_kill_after_the_feed_push_leaves_one_record(seeded, tmp_path):
    """The narrowest window: the feed pushed, the ledger not yet told. The test holds the
    ledger's SQLite write lock from the publish step on, so the run blocks in ledger.finish
    (after its push); the run is killed once its record is on the Hub."""
    bot = Bot(seeded, "kill-bot-after-push", tmp_path / "work")
    lock = {}

    def hold_the_ledger(proc):
        conn = sqlite3.connect(bot.workdir / "ledger.sqlite", isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the run's ledger.finish waits behind this
        lock["conn"] = conn

    def wait_for_the_push(proc):
        deadline = time.monotonic() + 120
        while not bot.feed_records():
            assert proc.poll() is None and time.monotonic() < deadline, "no feed push"
            time.sleep(0.1)

    try:
        bot.run_until("publish", before_kill=lambda p: (hold_the_ledger(p),
                                                        wait_for_the_push(p)))
    finally:
        if "conn" in lock:
            lock["conn"].execute("ROLLBACK")
            lock["conn"].close()
    assert bot.variant_state()[0] == "complete"
    assert len(bot.feed_records()) == 1
    assert bot.ledger_entry().status == "running"
    records = _check_retry(bot)
    assert len(records) == 1, records  # the retry's push finds its record there already
