"""Discovery against the local hub seeded with the zoo and decoys: `run --once --discover-only`."""

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import HfApi

from bot.zoo.seed import card, seed_decoys, seed_zoo, upload

BIG = 6_000_000  # the decoy over the size limit below


@pytest.fixture(scope="module")
def seeded(localhub, zoo):
    directory, _ = zoo
    alice = HfApi(endpoint=localhub.url, token="hf_alice_token")
    bob = HfApi(endpoint=localhub.url, token="hf_bob_token")
    shas = seed_zoo(alice, bob, directory, "alice", "bob")
    decoys = seed_decoys(bob, directory, "alice/zoo-base-it", "bob", BIG)
    upload(bob, "bob/decoy-gated", directory / "zoo-ft-echo",
           card("alice/zoo-base-it", ["fine-tune"], relation="finetune"))
    localhub.set_gated("bob/decoy-gated", "manual")  # alice, the bot here, has no access
    decoys["bob/decoy-gated"] = "gated"
    return localhub, shas, decoys


def run_once(hub, workdir, *sets):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_alice_token",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    args = ["--set", "watch.bases=alice/zoo-base-it", "--set", "watch.max_model_gb=0.005",
            *[x for s in sets for x in ("--set", s)]]
    out = subprocess.run([sys.executable, "-m", "bot.cli", "run", "--once", "--discover-only",
                          "--workdir",
                          str(workdir), "--json", *args], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout)


def test_run_once_finds_candidates_and_skips_decoys(seeded, tmp_path):
    hub, shas, decoys = seeded
    first = run_once(hub, tmp_path)
    found = {c["repo"]: c for c in first["candidates"]}
    assert set(found) == {"bob/zoo-ft-flip", "bob/zoo-ft-echo", "bob/zoo-lora-flip",
                          "bob/zoo-ft-newtoken"}
    assert found["bob/zoo-ft-flip"]["action"] == "pull-request"  # opted in with the tag
    assert found["bob/zoo-ft-echo"]["action"] == "variant"
    assert found["bob/zoo-lora-flip"]["kind"] == "adapter"
    for repo, c in found.items():
        assert c["revision"] == shas[repo] and c["base"] == "alice/zoo-base-it"
    skips = {s["repo"]: s["reason"] for s in first["skips"]}
    assert set(skips) == set(decoys)
    for repo, reason in decoys.items():
        assert reason in skips[repo], (repo, skips[repo])
    # a second cycle finds nothing new: everything is in the ledger at its revision
    second = run_once(hub, tmp_path)
    assert second["candidates"] == [] and second["skips"] == []
    assert second["already_seen"] == len(found) + len(decoys)


def test_unopted_policy_and_the_cycle_limit(seeded, tmp_path):
    hub, _, _ = seeded
    result = run_once(hub, tmp_path / "a", "publish.unopted=skip")
    assert [c["repo"] for c in result["candidates"]] == ["bob/zoo-ft-flip"]
    assert any("not opted in" in s["reason"] for s in result["skips"])
    limited = run_once(hub, tmp_path / "b", "watch.max_candidates=2")
    assert len(limited["candidates"]) == 2 and limited["deferred"] >= 1
    # the deferred ones come in the next cycle
    again = run_once(hub, tmp_path / "b", "watch.max_candidates=50")
    assert len(again["candidates"]) + len(again["skips"]) == limited["deferred"]


def test_a_new_revision_is_a_new_candidate(seeded, tmp_path):
    hub, _, _ = seeded
    run_once(hub, tmp_path)
    bob = HfApi(endpoint=hub.url, token="hf_bob_token")
    bob.upload_file(path_or_fileobj=b"notes", path_in_repo="NOTES.md",
                    repo_id="bob/zoo-ft-echo")
    again = run_once(hub, tmp_path)
    assert [c["repo"] for c in again["candidates"]] == ["bob/zoo-ft-echo"]


def test_discover_only_lists_what_is_left_to_retry(seeded, tmp_path):
    """Queued and failed-with-attempts-left entries come back under "retry" (the Actions
    matrix takes them) once their wait is over; a published one does not."""
    from bot.ledger import Ledger

    hub, _, _ = seeded
    first = run_once(hub, tmp_path)
    assert first["retry"] == []  # everything new is under "candidates"
    revision = {c["repo"]: c["revision"] for c in first["candidates"]}
    with Ledger(tmp_path / "ledger.sqlite") as waiting:  # the default wait: 10 min
        waiting.fail(waiting.claim("test", "bob/zoo-ft-newtoken",
                                   revision["bob/zoo-ft-newtoken"]), "the Hub timed out")
    with Ledger(tmp_path / "ledger.sqlite", retry_seconds=0) as ledger:
        failed = ledger.claim("test", "bob/zoo-ft-flip",
                              next(c["revision"] for c in first["candidates"]
                                   if c["repo"] == "bob/zoo-ft-flip"))
        ledger.fail(failed, "the GPU job ran out of memory")
        done = ledger.claim("test", "bob/zoo-ft-echo",
                            next(c["revision"] for c in first["candidates"]
                                 if c["repo"] == "bob/zoo-ft-echo"))
        ledger.finish(done, "published")
    again = run_once(hub, tmp_path)
    retry = {r["repo"]: r["status"] for r in again["retry"]}
    assert retry == {"bob/zoo-ft-flip": "failed", "bob/zoo-lora-flip": "queued"}


def test_prompt_sets_from_a_hub_dataset(localhub, monkeypatch):
    """`hf:owner/name[:split]` loads a dataset repo's JSONL through bot/hub.py."""
    from bot.prompt_sets import load_prompt_set

    alice = HfApi(endpoint=localhub.url, token="hf_alice_token")
    alice.create_repo("alice/harmful-set", repo_type="dataset")
    rows = "".join(json.dumps({"goal": f"request {i}", "category": "c"}) + "\n"
                   for i in range(3))
    alice.upload_file(path_or_fileobj=rows.encode(), path_in_repo="data/test.jsonl",
                      repo_id="alice/harmful-set", repo_type="dataset")
    monkeypatch.setenv("HF_ENDPOINT", localhub.url)
    s = load_prompt_set("hf:alice/harmful-set:test")
    assert s.prompts == ("request 0", "request 1", "request 2") and s.categories[0] == "c"
    with pytest.raises(Exception, match="no such dataset|not found"):
        load_prompt_set("hf:alice/no-such-set")
