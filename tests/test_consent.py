"""What owners allow and what strangers' text may do (issue 13, first part): private, gated and
opted-out repos are never candidates, a repo made private after discovery is withheld, a
stranger's config values print as one harmless line, and secrets stay out of dumps and errors."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from huggingface_hub import HfApi

from bot.config import load_settings
from bot.errors import UsageError
from bot.ledger import Ledger
from bot.localhub import Fault, LocalHub
from bot.pipeline import run_once
from bot.publish import feed
from bot.zoo.seed import card, upload

from conftest import act_as, sweet_spot

ROOT = Path(__file__).resolve().parent.parent
BOT, BOT_TOKEN = "consent-bot", "hf_consent_bot_token"


@pytest.fixture(scope="module")
def world(localhub, zoo, tmp_path_factory):
    """A hub of its own: gina owns the base and fine-tunes, also in the org `shared`, which the
    bot belongs to too (so it can read that org's private repos)."""
    directory, report = zoo
    hub = LocalHub(tmp_path_factory.mktemp("consent-hub")).start()
    hub.add_user("gina", "hf_gina_token", orgs=["shared"])
    hub.add_user(BOT, BOT_TOKEN, orgs=["shared"])
    try:
        yield hub, directory, sweet_spot(report, "zoo-ft-echo")
    finally:
        hub.stop()


@pytest.fixture
def bot(world, monkeypatch, tmp_path):
    act_as(monkeypatch, world[0], BOT_TOKEN)
    return tmp_path


def seed(world, base: str, repo: str, *, tags=(), private=False, config=None) -> str:
    hub, directory, _ = world
    gina = HfApi(endpoint=hub.url, token="hf_gina_token")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        shutil.copytree(directory / "zoo-ft-echo", folder)
        if config:
            path = folder / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return upload(gina, repo, folder, card(base, ["fine-tune", *tags], relation="finetune"),
                      private=private)


def settings(world, base: str, repos: list[str], workdir: Path, *extra: str):
    _, directory, weight = world
    task = str(directory / "prompts" / "echo_heldout.jsonl")
    return load_settings(ROOT / "bot" / "zoo" / "evaluate.toml", [
        f"watch.bases={base}", f"sweep.grid=[{weight}]",
        "evaluate.task_files=" + json.dumps({r: task for r in repos}),
        f"publish.feed_repo={BOT}/results", *extra])


def test_private_gated_and_opted_out_repos_are_never_candidates(world, bot):
    hub, directory, _ = world
    base = "gina/base-consent"
    upload(HfApi(endpoint=hub.url, token="hf_gina_token"), base, directory / "zoo-base-it",
           card(None, ["safety-aligned"]))
    seed(world, base, "shared/private-ft", private=True)  # the bot can read it: not enough
    seed(world, base, "gina/gated-ft")
    hub.set_gated("gina/gated-ft", "auto")
    seed(world, base, "gina/opted-out-ft", tags=["safeguard-opt-out"])
    seed(world, base, "gina/quantized-ft",
         config={"quantization_config": {"quant_method": "x\n::error::owned\x1b[31m"}})
    seed(world, base, "gina/welcome-ft")
    found = run_once(settings(world, base, [], bot), bot, discover_only=True).discovery
    assert [c.repo for c in found.candidates] == ["gina/welcome-ft"]
    skips = {s.repo: s.reason for s in found.skips}
    assert skips["shared/private-ft"].startswith("private")
    assert skips["gina/gated-ft"] == "gated (watch.include_gated is off)"
    assert skips["gina/opted-out-ft"] == "opted out (tagged 'safeguard-opt-out')"
    strange = skips["gina/quantized-ft"]  # a stranger's value: one line, no workflow command
    assert strange.startswith("quantized (x ") and "::" not in strange
    assert not any(ord(c) < 32 or c == "\x1b" for c in strange)
    with_gated = run_once(settings(world, base, [], bot, "watch.include_gated=true"),
                          bot / "again", discover_only=True).discovery
    gated = {s.repo: s.reason for s in with_gated.skips}["gina/gated-ft"]
    assert gated == "gated, and this token has no access"  # allowed now, but not granted


def test_a_repo_made_private_while_it_is_processed_is_withheld(world, bot):
    hub, directory, _ = world
    base, repo = "gina/base-later-private", "shared/later-private"
    upload(HfApi(endpoint=hub.url, token="hf_gina_token"), base, directory / "zoo-base-it",
           card(None, ["safety-aligned"]))
    sha = seed(world, base, repo)
    s = settings(world, base, [repo], bot)
    # its owner makes it private while the bot downloads it (a stall gives the moment)
    stall = hub.add_fault(Fault("hang", seconds=1, first=1,
                                path=rf"^/{repo}/resolve/[0-9a-f]+/model\.safetensors"))

    def hide() -> None:
        deadline = time.monotonic() + 120
        while stall.injected == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        HfApi(endpoint=hub.url, token="hf_gina_token").update_repo_settings(repo, private=True)

    owner = threading.Thread(target=hide, daemon=True)
    owner.start()
    try:
        (outcome,) = run_once(s, bot).processed
    finally:
        owner.join(timeout=10)
        hub.clear_faults()
    assert outcome.publication.decision == "withheld" and outcome.status == "skipped"
    assert "private" in outcome.reason
    api = HfApi(endpoint=hub.url, token=BOT_TOKEN)
    assert not api.repo_exists(f"{BOT}/shared__later-private-safeguarded")
    assert not (bot / "feed" / "results.jsonl").exists()  # not named in the feed either
    with Ledger(bot / "ledger.sqlite") as ledger:
        assert ledger.seen(repo, sha).status == "skipped"


def test_secrets_stay_out_of_dumps_and_errors(tmp_path):
    s = load_settings(None, ["ledger.url=postgresql://bot:s3cret@db.internal:5432/safeguard"])
    dumped = json.dumps(s.model_dump())
    assert "s3cret" not in dumped and "bot:***@db.internal:5432" in dumped
    assert s.ledger.url.endswith("s3cret@db.internal:5432/safeguard")  # still usable
    with pytest.raises(UsageError) as e:
        Ledger("mysql://bot:s3cret@db.internal/safeguard")
    assert "s3cret" not in str(e.value)


def test_the_feed_drops_control_characters(tmp_path):
    record = feed.record("gina/x", "a" * 40, "gina/base", "failed", "bell \x07 and \x1b[31m")
    paths = feed.write_local([record], tmp_path)
    root = ET.fromstring(paths["atom"].read_text())  # valid XML
    summary = root.find("{http://www.w3.org/2005/Atom}entry/{http://www.w3.org/2005/Atom}summary")
    assert summary.text == "bell  and [31m"
    assert "\x07" not in paths["leaderboard"].read_text()
