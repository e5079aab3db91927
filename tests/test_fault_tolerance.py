"""Fault tolerance on a local hub made to misbehave (bot/localhub fault mode) and hostile repos:
an outage is never a decision, one bad repo never stops a cycle, no entry is left running, a
hanging Hub is timed out, pull requests and feed records are never doubled, the lease holds
through a long step, and the disk and the download cache are looked after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from bot import hub as bot_hub
from bot.config import HubSettings, load_settings
from bot.ledger import Ledger
from bot.localhub import Fault, LocalHub
from bot.pipeline import run_once
from bot.zoo.seed import OPT_IN_TAG, card, upload

from conftest import act_as, sweet_spot

ROOT = Path(__file__).resolve().parent.parent
BOT, BOT_TOKEN = "fault-bot", "hf_fault_bot_token"
FEED = f"{BOT}/results"


@pytest.fixture(scope="module")
def world(localhub, zoo, tmp_path_factory):
    """A hub of this module's own (its faults touch no other test): erin owns the bases, frank
    the fine-tunes, fault-bot is the bot."""
    directory, report = zoo
    hub = LocalHub(tmp_path_factory.mktemp("faulty-hub")).start()
    hub.add_user("erin", "hf_erin_token", orgs=["erinorg"])
    hub.add_user("frank", "hf_frank_token")
    hub.add_user(BOT, BOT_TOKEN)
    try:
        yield hub, directory, sweet_spot(report, "zoo-ft-echo")
    finally:
        hub.stop()


@pytest.fixture
def bot(world, monkeypatch, tmp_path):
    """The bot's environment for an in-process cycle; faults and hub settings are undone."""
    hub = world[0]
    act_as(monkeypatch, hub, BOT_TOKEN)
    yield tmp_path
    hub.clear_faults()
    bot_hub.configure(HubSettings())


def seed(world, name: str, *, tags=(), config: dict | str | None = None,
         base: str | None = None) -> tuple[str, str, str]:
    """frank/NAME, a copy of zoo-ft-echo with `config` merged into its config.json (or, a
    string, as its config.json), declaring `base`, else a base of its own (erinorg/base-NAME:
    discovery then sees only this test's repos); (base, repo, sha)."""
    hub, directory, _ = world
    if base is None:
        base = f"erinorg/base-{name}"
        upload(HfApi(endpoint=hub.url, token="hf_erin_token"), base, directory / "zoo-base-it",
               card(None, ["safety-aligned"]))
    repo = f"frank/{name}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        shutil.copytree(directory / "zoo-ft-echo", folder)
        path = folder / "config.json"
        if isinstance(config, str):
            path.write_text(config)
        elif config is not None:
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        sha = upload(HfApi(endpoint=hub.url, token="hf_frank_token"), repo, folder,
                     card(base, ["fine-tune", *tags], relation="finetune"))
    return base, repo, sha


def settings(world, base: str, repos: list[str], workdir: Path, *extra: str):
    """The zoo's evaluation with one sweep point (the echo task's sweet spot), quick retries."""
    _, directory, weight = world
    task = str(directory / "prompts" / "echo_heldout.jsonl")
    return load_settings(ROOT / "bot" / "zoo" / "evaluate.toml", [
        f"watch.bases={base}", f"sweep.grid=[{weight}]",
        "evaluate.task_files=" + json.dumps({r: task for r in repos}),
        f"publish.feed_repo={FEED}", f"hub.cache_dir={workdir / 'hf-cache'}",
        "hub.retries=1", "hub.retry_wait_seconds=0.05", "hub.read_timeout=5",
        "ledger.retry_seconds=0.5", *extra])


def entry(workdir: Path, repo: str, sha: str):
    with Ledger(workdir / "ledger.sqlite") as ledger:
        return ledger.seen(repo, sha)


def running(workdir: Path) -> list:
    with Ledger(workdir / "ledger.sqlite") as ledger:
        return ledger.entries("running")


def feed_lines(world, repo: str) -> list[dict]:
    hub = world[0]
    path = hf_hub_download(FEED, "results.jsonl", repo_type="dataset", endpoint=hub.url,
                           token=BOT_TOKEN, force_download=True)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r["repo"] == repo]


def test_an_outage_at_discovery_is_never_a_skip(world, bot):
    base, repo, sha = seed(world, "outage")
    s = settings(world, base, [repo], bot)
    hub = world[0]
    fault = hub.add_fault(Fault("status", path=rf"^/api/models/{repo}/revision/", status=503))
    first = run_once(s, bot, discover_only=True)
    assert fault.injected == 2  # one retry (hub.retries=1), then it waits for a later cycle
    assert [x.repo for x in first.discovery.later] == [repo]
    assert "503" in first.discovery.later[0].reason and not first.discovery.skips
    queued = entry(bot, repo, sha)
    assert (queued.status, queued.deferrals, queued.attempts) == ("queued", 1, 0)
    assert queued.retry_at > queued.updated_at
    hub.clear_faults()
    time.sleep(max(0.0, queued.retry_at.timestamp() - time.time()) + 0.1)
    again = run_once(s, bot)  # the queued revision is judged again when claimed: a candidate
    assert [(p.repo, p.status) for p in again.processed] == [(repo, "published")]
    assert running(bot) == []


def test_a_rate_limited_cycle_slows_down_and_the_fine_tune_leaves_the_cache(world, bot):
    base, repo, sha = seed(world, "ratelimited")
    s = settings(world, base, [repo], bot)
    hub = world[0]
    limit = hub.add_fault(Fault("status", path=r"^/api/models$", status=429, seconds=1,
                                first=2))
    started = time.monotonic()
    result = run_once(s, bot)
    assert limit.injected == 2 and time.monotonic() - started >= 1.5  # waited for the resets
    assert [(p.repo, p.status) for p in result.processed] == [(repo, "published")]
    assert result.discovery.errors == []  # the first listing got through on its retry
    cached = {p.name for p in (bot / "hf-cache").iterdir()}
    assert f"models--{base.replace('/', '--')}" in cached  # bases stay: the next one reuses it
    snapshots = bot / "hf-cache" / f"models--{repo.replace('/', '--')}" / "snapshots"
    assert not (snapshots / sha).exists()  # the fine-tune's download is gone


def test_one_hostile_repo_never_stops_the_cycle(world, bot):
    base, good, _ = seed(world, "hostile-good")
    shas = {repo: seed(world, repo.split("/")[1], config=config, base=base)[2]
            for repo, config in [("frank/hostile-nested", "[" * 100_000 + "]" * 100_000),
                                 ("frank/hostile-huge-config", {"padding": "x" * 1_200_000}),
                                 ("frank/hostile-refused", {"hidden_act": "not-an-activation"})]}
    bad = list(shas)
    s = settings(world, base, [good, *bad], bot, "hub.max_file_mb=1", "ledger.retry_seconds=600")
    result = run_once(s, bot)
    skips = {x.repo: x.reason for x in result.discovery.skips}
    assert "nested too deeply" in skips["frank/hostile-nested"]
    assert "larger than hub.max_file_mb" in skips["frank/hostile-huge-config"]
    outcomes = {p.repo: p for p in result.processed}
    assert outcomes[good].status == "published"
    refused = outcomes["frank/hostile-refused"]
    assert refused.status == "failed" and refused.reason.startswith("KeyError")
    assert "\n" not in refused.reason  # one line; the traceback went to the log
    failed = entry(bot, "frank/hostile-refused", shas["frank/hostile-refused"])
    assert (failed.status, failed.attempts) == ("failed", 1) and failed.retry_at is not None
    assert running(bot) == []
    again = run_once(s, bot)  # nothing crashes the next cycle; the failure waits its turn
    assert again.processed == () and again.discovery.already_seen == 4


def test_a_revision_that_vanishes_mid_download_is_skipped_as_gone(world, bot):
    base, repo, sha = seed(world, "vanishing")
    s = settings(world, base, [repo], bot)
    hub = world[0]
    stall = hub.add_fault(Fault("hang", path=rf"^/{repo}/resolve/[0-9a-f]+/model\.safetensors",
                                seconds=1.5, first=1))

    def delete_when_stalled() -> None:
        deadline = time.monotonic() + 120
        while stall.injected == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        HfApi(endpoint=hub.url, token="hf_frank_token").delete_repo(repo)

    deleter = threading.Thread(target=delete_when_stalled, daemon=True)
    deleter.start()
    result = run_once(s, bot)
    deleter.join(timeout=5)
    assert stall.injected == 1
    (outcome,) = result.processed
    assert outcome.status == "skipped" and outcome.reason.startswith("gone from the Hub")
    assert entry(bot, repo, sha).status == "skipped" and running(bot) == []


def test_the_pull_request_is_never_opened_twice(world, bot, tmp_path_factory):
    base, repo, sha = seed(world, "opted-in", tags=[OPT_IN_TAG])
    s = settings(world, base, [repo], bot)
    hub = world[0]
    # the commit lands, but the client is told 503: a blind retry would open a second PR
    landed = hub.add_fault(Fault("status", method="POST", path=rf"^/api/models/{repo}/commit/",
                                 status=503, after=True, first=1))
    (outcome,) = run_once(s, bot).processed
    assert landed.injected == 1
    assert (outcome.status, outcome.publication.decision) == ("published", "pull-request")
    frank = HfApi(endpoint=hub.url, token="hf_frank_token")
    prs = [d for d in frank.get_repo_discussions(repo, author=BOT)]
    assert len(prs) == 1 and f"@{sha[:8]}" in prs[0].title
    assert outcome.publication.links["pull_request"].endswith(f"/discussions/{prs[0].num}")
    # the owner declines; another runner (a fresh ledger) never opens it again
    frank.change_discussion_status(repo, prs[0].num, "closed")
    other = tmp_path_factory.mktemp("other-runner")
    (again,) = run_once(settings(world, base, [repo], other), other).processed
    assert (again.status, again.publication.decision) == ("skipped", "declined")
    assert f"closed pull request #{prs[0].num}" in again.reason
    assert entry(other, repo, sha).status == "skipped"
    assert len(list(frank.get_repo_discussions(repo, author=BOT))) == 1


def test_a_pull_request_commit_that_times_out_is_never_sent_again(world, bot):
    base, repo, sha = seed(world, "slow-pr", tags=[OPT_IN_TAG])
    s = settings(world, base, [repo], bot, "hub.read_timeout=1")
    hub = world[0]
    # the client gives up after 1 s; the Hub goes on and opens the pull request at 3 s
    slow = hub.add_fault(Fault("hang", method="POST", path=rf"^/api/models/{repo}/commit/",
                               seconds=3, first=1))
    (first,) = run_once(s, bot).processed
    assert slow.injected == 1 and first.status == "deferred"  # not sent a second time
    frank = HfApi(endpoint=hub.url, token="hf_frank_token")
    deadline = time.monotonic() + 30
    while not list(frank.get_repo_discussions(repo, author=BOT)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    waiting = entry(bot, repo, sha)
    time.sleep(max(0.0, waiting.retry_at.timestamp() - time.time()) + 0.1)
    (second,) = run_once(s, bot).processed  # its next claim finds the one that landed
    assert second.status == "published" and "already open" in second.reason
    assert len(list(frank.get_repo_discussions(repo, author=BOT))) == 1


def test_a_failed_feed_push_is_pushed_later_without_redoing_anything(world, bot):
    base, repo, sha = seed(world, "feed-outage")
    s = settings(world, base, [repo], bot)
    hub = world[0]
    outage = hub.add_fault(Fault("status", path=rf"^/api/datasets/{FEED}", status=503))
    (outcome,) = run_once(s, bot).processed
    assert outage.injected > 0 and outcome.status == "published" and outcome.feed_pending
    published = entry(bot, repo, sha)
    assert published.status == "published" and json.loads(published.feed_pending)["repo"] == repo
    hub.clear_faults()
    later = run_once(s, bot)
    assert later.processed == ()  # no sweep, merge or publication again
    assert entry(bot, repo, sha).feed_pending is None
    assert [r["decision"] for r in feed_lines(world, repo)] == ["variant"]  # once


def test_the_lease_is_renewed_while_a_long_upload_runs(world, bot):
    base, repo, sha = seed(world, "long-upload")
    s = settings(world, base, [repo], bot, "ledger.lease_seconds=1", "hub.read_timeout=30")
    hub = world[0]
    slow = hub.add_fault(Fault("hang", method="POST", seconds=3,
                               path=rf"^/api/models/{BOT}/frank__long-upload-safeguarded/commit/"))
    stolen, done = [], threading.Event()
    rival = Ledger(bot / "ledger.sqlite")

    def thief() -> None:  # a second worker, trying to claim all along
        while not done.is_set():
            got = rival.claim("thief")
            if got is not None:
                stolen.append(got)
            time.sleep(0.1)

    competitor = threading.Thread(target=thief, daemon=True)
    competitor.start()
    try:
        (outcome,) = run_once(s, bot).processed
    finally:
        done.set()
        competitor.join(timeout=10)
        rival.close()
    assert slow.injected == 1 and outcome.status == "published"
    assert stolen == []  # 3 s of upload on a 1 s lease, and nobody could take it
    assert entry(bot, repo, sha).attempts == 1


def test_a_short_disk_defers_with_a_clear_reason(world, bot):
    base, repo, sha = seed(world, "no-room")
    s = settings(world, base, [repo], bot, "hub.disk_margin_gb=1000000")
    (outcome,) = run_once(s, bot).processed
    assert outcome.status == "deferred" and "not enough disk" in outcome.reason
    waiting = entry(bot, repo, sha)
    assert (waiting.status, waiting.attempts, waiting.deferrals) == ("queued", 0, 1)
    assert not (bot / "hf-cache" / f"models--{repo.replace('/', '--')}").exists()


def test_a_hub_that_never_answers_is_timed_out(world, bot):
    base, repo, sha = seed(world, "silent")
    s = settings(world, base, [repo], bot, "hub.read_timeout=1")
    hub = world[0]
    silent = hub.add_fault(Fault("hang", path=rf"^/api/models/{repo}/revision/", seconds=600))
    started = time.monotonic()
    result = run_once(s, bot, discover_only=True)
    assert time.monotonic() - started < 30 and silent.injected == 2
    (later,) = result.discovery.later
    assert later.repo == repo and "Timeout" in later.reason


def _cli(world, command: list[str], workdir: Path, *sets: str) -> subprocess.Popen:
    hub, directory, weight = world
    args = [sys.executable, "-m", "bot.cli", *command, "--workdir", str(workdir),
            *(["--json"] if command[0] == "process" else []),
            "--config", str(ROOT / "bot" / "zoo" / "evaluate.toml"),
            "--set", f"sweep.grid=[{weight}]", "--set", f"publish.feed_repo={FEED}",
            *[x for s in sets for x in ("--set", s)]]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **hub.env(BOT_TOKEN)})


def test_process_exits_non_zero_when_its_candidate_failed(world, tmp_path):
    base, repo, sha = seed(world, "refused-cli", config={"hidden_act": "not-an-activation"})
    proc = _cli(world, ["process", repo], tmp_path, f"watch.bases={base}")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    result = json.loads(out)
    assert result["status"] == "failed" and result["reason"].startswith("KeyError")
    assert entry(tmp_path, repo, sha).status == "failed" and running(tmp_path) == []


@pytest.mark.parametrize("command", ["process", "watch"])
def test_sigterm_while_a_call_hangs_releases_within_the_grace_period(world, tmp_path,
                                                                     command):
    base, repo, sha = seed(world, f"hangs-{command}")
    hub = world[0]
    stall = hub.add_fault(Fault("hang", seconds=600,
                                path=rf"^/{repo}/resolve/[0-9a-f]+/model\.safetensors"))
    try:
        proc = _cli(world, [command, repo] if command == "process" else [command], tmp_path,
                    f"watch.bases={base}", "hub.read_timeout=600", "daemon.grace_seconds=2")
        try:
            deadline = time.monotonic() + 180
            while stall.injected == 0:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.stderr.read()[-2000:]
                time.sleep(0.05)
            held = entry(tmp_path, repo, sha)
            assert held.status == "running"
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            proc.wait(timeout=60)
            assert time.monotonic() - stopped < 20  # the grace period (2 s), not the hang
            assert proc.returncode == (143 if command == "process" else 0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        hub.clear_faults()
    back = entry(tmp_path, repo, sha)
    assert (back.status, back.attempts) == ("queued", 0), back
    assert back.reason.startswith("released by")


def test_a_download_takes_only_what_a_merge_needs(world, bot):
    base, repo, sha = seed(world, "extra-files")
    hub, directory, _ = world
    frank = HfApi(endpoint=hub.url, token="hf_frank_token")
    frank.upload_file(path_or_fileobj=json.dumps({"log": "x" * 2_000_000}).encode(),
                      path_in_repo="trainer_state.json", repo_id=repo)
    frank.upload_file(path_or_fileobj=b"import os\n", path_in_repo="modeling_evil.py",
                      repo_id=repo)
    bot_hub.configure(settings(world, base, [repo], bot, "hub.max_file_mb=1").hub)
    local = bot_hub.download_model(repo)
    names = {p.name for p in local.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert "trainer_state.json" not in names  # over hub.max_file_mb
    assert "modeling_evil.py" not in names  # code is never downloaded
    assert str(local).startswith(str(bot / "hf-cache"))  # hub.cache_dir


def test_a_refused_publication_fails_and_leaves_no_merged_weights(world, bot):
    base, repo, sha = seed(world, "refused-upload")
    s = settings(world, base, [repo], bot)
    hub = world[0]
    hub.add_fault(Fault("status", method="POST", status=403,
                        path=rf"^/api/models/{BOT}/frank__refused-upload-safeguarded/commit/"))
    (outcome,) = run_once(s, bot).processed
    assert outcome.status == "failed" and "403" in outcome.reason
    assert entry(bot, repo, sha).status == "failed" and running(bot) == []
    assert list((bot / "merged").iterdir()) == []  # a GB-sized merge never piles up
