"""Coverage (issue 13): fine-tunes of a quantized or renamed copy of a watched base are its
candidates (bot/ancestry.py), within a bounded depth; MLX quantizations are skipped early; a
watched base the token cannot read is one error line, and its fine-tunes wait unrecorded."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

from bot.config import load_settings
from bot.discovery import candidate_for
from bot.ledger import Ledger
from bot.localhub import LocalHub
from bot.pipeline import process_one, run_once
from bot.zoo.seed import card, upload

from conftest import act_as

BOT, BOT_TOKEN = "ancestry-bot", "hf_ancestry_bot_token"
OWNER, OWNER_TOKEN = "quinn", "hf_quinn_token"


@pytest.fixture(scope="module")
def world(localhub, zoo, tmp_path_factory):
    """A hub of its own (`localhub` lets the client reach 127.0.0.1): quinn owns the bases,
    their copies and fine-tunes; the bot only reads."""
    directory, _ = zoo
    hub = LocalHub(tmp_path_factory.mktemp("ancestry-hub")).start()
    hub.add_user(OWNER, OWNER_TOKEN)
    hub.add_user(BOT, BOT_TOKEN)
    try:
        yield hub, directory
    finally:
        hub.stop()


@pytest.fixture
def bot(world, monkeypatch, tmp_path):
    act_as(monkeypatch, world[0], BOT_TOKEN)
    return tmp_path


def put(world, repo: str, model: str, readme: str, config: dict | None = None) -> str:
    """Upload zoo model `model` as `repo` with `readme`, its config.json updated by `config`."""
    hub, directory = world
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        shutil.copytree(directory / model, folder)
        if config:
            path = folder / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return upload(HfApi(endpoint=hub.url, token=OWNER_TOKEN), repo, folder, readme)


def base(world, repo: str) -> str:
    return put(world, repo, "zoo-base-it", card(None, ["safety-aligned"]))


def quantized(world, repo: str, of: str) -> str:
    """A bitsandbytes 4-bit copy of `of` in safetensors, declared as a quantization of it."""
    return put(world, repo, "zoo-base-it", card(of, ["4-bit"], relation="quantized"),
               {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})


def finetune(world, repo: str, of: str, config: dict | None = None) -> str:
    return put(world, repo, "zoo-ft-echo", card(of, ["fine-tune"], relation="finetune"), config)


def settings(workdir: Path, watched: str, *extra: str):
    return load_settings(None, [f"watch.bases={watched}", f"hub.cache_dir={workdir / 'hf-cache'}",
                                "hub.retries=0", *extra])


def discover(workdir: Path, watched: str, *extra: str):
    return run_once(settings(workdir, watched, *extra), workdir, discover_only=True).discovery


def test_a_finetune_of_a_quantized_copy_is_a_candidate_of_the_watched_base(world, bot):
    w, copy = f"{OWNER}/base-q", f"{OWNER}/base-q-bnb-4bit"
    base(world, w)
    quantized(world, copy, w)
    sha = finetune(world, f"{OWNER}/ft-of-bnb", copy)  # full precision: fine
    finetune(world, f"{OWNER}/ft-of-bnb-4bit", copy,  # its own weights quantized: skipped
             {"quantization_config": {"quant_method": "bitsandbytes"}})
    finetune(world, f"{OWNER}/ft-of-bnb-arch", copy,  # checked against the watched base
             {"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    found = discover(bot, w)
    assert [(c.repo, c.revision, c.base, c.via) for c in found.candidates] == [
        (f"{OWNER}/ft-of-bnb", sha, w, copy)]
    assert found.candidates[0].to_dict()["via"] == copy  # in the cycle's JSON
    skips = {s.repo: (s.reason, s.base, s.via) for s in found.skips}
    assert skips == {
        f"{OWNER}/ft-of-bnb-4bit": ("quantized (bitsandbytes)", w, copy),
        f"{OWNER}/ft-of-bnb-arch": (skips[f"{OWNER}/ft-of-bnb-arch"][0], w, copy)}
    assert skips[f"{OWNER}/ft-of-bnb-arch"][0].startswith("architecture differs from the base")
    assert found.errors == []
    with Ledger(bot / "ledger.sqlite") as ledger:  # queued with the watched base
        assert ledger.seen(f"{OWNER}/ft-of-bnb", sha).base == w
    # claimed from the queue (or a webhook, or `process`), it is judged the same way
    again = candidate_for(f"{OWNER}/ft-of-bnb", sha, settings(bot, w))
    assert (again.base, again.via, type(again).__name__) == (w, copy, "Candidate")


def test_an_alias_stands_for_its_base(world, bot):
    w, renamed = f"{OWNER}/base-a", f"{OWNER}/renamed-copy"
    base(world, w)
    base(world, renamed)  # the same weights under another name; its card names no base
    sha = finetune(world, f"{OWNER}/ft-of-renamed", renamed)
    assert discover(bot / "plain", w).candidates == []
    aliased = f"watch.aliases={json.dumps({renamed: w})}"
    found = discover(bot / "aliased", w, aliased)
    assert [(c.repo, c.revision, c.base, c.via) for c in found.candidates] == [
        (f"{OWNER}/ft-of-renamed", sha, w, renamed)]
    again = candidate_for(f"{OWNER}/ft-of-renamed", sha, settings(bot, w, aliased))
    assert (again.base, again.via) == (w, renamed)


def test_the_depth_bounds_the_chain(world, bot):
    w, q1, q2 = f"{OWNER}/base-d", f"{OWNER}/base-d-q1", f"{OWNER}/base-d-q2"
    base(world, w)
    quantized(world, q1, w)
    quantized(world, q2, q1)  # a quantization of the quantization
    finetune(world, f"{OWNER}/ft-of-q1", q1)
    sha2 = finetune(world, f"{OWNER}/ft-of-q2", q2)  # three links up to the base

    def found(depth: int) -> dict:
        d = discover(bot / f"depth-{depth}", w, f"watch.ancestry_depth={depth}")
        return {c.repo: c.via for c in d.candidates}

    assert found(1) == {}
    assert found(2) == {f"{OWNER}/ft-of-q1": q1}
    assert found(3) == {f"{OWNER}/ft-of-q1": q1, f"{OWNER}/ft-of-q2": q2}
    beyond = candidate_for(f"{OWNER}/ft-of-q2", sha2, settings(bot, w))  # depth 2
    assert (beyond.base, beyond.via) == (q2, None)  # its declared base, not watched


def test_mlx_quantizations_are_skipped_early(world, bot):
    w = f"{OWNER}/base-m"
    base(world, w)
    meta = {"license": "apache-2.0", "library_name": "mlx", "tags": ["mlx"], "base_model": w,
            "base_model_relation": "finetune"}
    put(world, f"{OWNER}/ft-mlx", "zoo-ft-echo",
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# mlx\n")
    finetune(world, f"{OWNER}/ft-mlx-config", w, {"quantization": {"group_size": 64, "bits": 4}})
    found = discover(bot, w)
    assert found.candidates == []
    assert {s.repo: s.reason for s in found.skips} == {
        f"{OWNER}/ft-mlx": "quantized (MLX)", f"{OWNER}/ft-mlx-config": "quantized (MLX)"}


def test_an_unreadable_base_is_one_error_and_its_finetunes_wait(world, bot):
    hub, _ = world
    w, copy = f"{OWNER}/base-gated", f"{OWNER}/base-gated-bnb-4bit"
    base(world, w)
    quantized(world, copy, w)
    shas = {f"{OWNER}/ft-gated-{i}": finetune(world, f"{OWNER}/ft-gated-{i}", w)
            for i in range(2)}
    shas[f"{OWNER}/ft-of-gated-copy"] = finetune(world, f"{OWNER}/ft-of-gated-copy", copy)
    hub.set_gated(w, "manual")  # the bot has not accepted its license
    for cycle in ("first", "second"):  # found again each cycle, never recorded
        found = discover(bot, w)
        assert (found.candidates, found.skips, found.later) == ([], [], [])
        (line,) = found.errors
        assert line.startswith(f"base {w} cannot be read with this token (gated, license not "
                               "accepted?): its fine-tunes wait"), (cycle, line)
        with Ledger(bot / "ledger.sqlite") as ledger:
            assert ledger.claimable() == []
            assert all(ledger.seen(repo, sha) is None for repo, sha in shas.items())
    # asked for one of them by name: it waits too, and the ledger does not hear of it
    outcome = process_one(f"{OWNER}/ft-gated-0", settings(bot, w), bot)
    assert outcome.status == "deferred" and "cannot be read with this token" in outcome.reason
    with Ledger(bot / "ledger.sqlite") as ledger:
        assert ledger.seen(f"{OWNER}/ft-gated-0", shas[f"{OWNER}/ft-gated-0"]) is None
    hub.grant_access(w, BOT)  # the license accepted: they are candidates now
    found = discover(bot, w)
    assert found.errors == [] and {c.repo for c in found.candidates} == set(shas)
