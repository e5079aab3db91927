"""`safeguard-bot watch` against the local hub: cycles, SIGTERM mid-candidate, exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from bot.ledger import Ledger
from bot.zoo.seed import card, upload

from conftest import sweet_spot

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub(localhub, zoo):
    directory, _ = zoo
    localhub.add_user("dave", "hf_dave_token", orgs=["daveorg"])
    localhub.add_user("daemon-bot", "hf_daemon_bot_token")
    dave = HfApi(endpoint=localhub.url, token="hf_dave_token")
    upload(dave, "daveorg/zoo-base-it", directory / "zoo-base-it", card(None, ["base"]))
    upload(dave, "dave/echo-ft", directory / "zoo-ft-echo",
           card("daveorg/zoo-base-it", ["fine-tune"]))
    return localhub, directory


def watch(hub, zoo_dir, workdir, *extra):
    weight = sweet_spot(json.loads((zoo_dir / "zoo.json").read_text()), "zoo-ft-echo")
    args = [sys.executable, "-m", "bot.cli", "watch", "--workdir", str(workdir), "--log-json",
            "--config", str(ROOT / "bot" / "zoo" / "evaluate.toml"),
            "--set", "watch.bases=daveorg/zoo-base-it", "--set", f"sweep.grid=[{weight}]",
            "--set", "evaluate.task_files=" + json.dumps(
                {"dave/echo-ft": str(zoo_dir / "prompts" / "echo_heldout.jsonl")}),
            "--set", "publish.feed_repo=daemon-bot/results",
            "--set", "daemon.interval_minutes=0.02", *extra]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **hub.env("hf_daemon_bot_token")})


def lines_until(proc, needle, timeout=180):
    """Read the daemon's JSON log lines until one contains `needle`."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen[-20:])
    raise AssertionError(f"{needle!r} never logged:\n{''.join(seen[-20:])}")


def test_sigterm_releases_and_a_restart_completes_exactly_once(hub, tmp_path):
    localhub, zoo_dir = hub
    proc = watch(localhub, zoo_dir, tmp_path)
    lines_until(proc, "dave/echo-ft: step sweep")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        entry = ledger.seen("dave/echo-ft", HfApi(endpoint=localhub.url)
                            .model_info("dave/echo-ft").sha)
        assert entry.status == "queued" and entry.attempts == 0  # released, not failed
        assert "SIGTERM" in entry.reason
    api = HfApi(endpoint=localhub.url, token="hf_daemon_bot_token")
    assert not api.repo_exists("daemon-bot/dave__echo-ft-safeguarded")

    # two short cycles: the first completes the candidate, the second finds nothing new
    proc = watch(localhub, zoo_dir, tmp_path, "--max-cycles", "2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    health = [json.loads(x) for x in err.splitlines()
              if x.startswith("{") and '"event": "health"' in x]
    assert [h["published"] for h in health] == [1, 0]
    assert health[1]["new"] == 0
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        (entry,) = ledger.entries()
        assert entry.status == "published" and entry.attempts == 1
    commits = [c for c in api.list_repo_commits("daemon-bot/dave__echo-ft-safeguarded")
               if c.title.startswith("safeguard-bot:")]
    assert len(commits) == 1
    feed = Path(hf_hub_download("daemon-bot/results", "results.jsonl", repo_type="dataset",
                                endpoint=localhub.url)).read_text().splitlines()
    assert [json.loads(x)["repo"] for x in feed] == ["dave/echo-ft"]
