"""End to end on the local hub: seeded zoo -> run --once -> a pull request, variants, the feed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.config import load_settings
from bot.stages import evaluator_for as Evaluator
from bot.zoo import bars
from bot.zoo.seed import seed_zoo

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"zoo-ft-flip": "flip", "zoo-ft-echo": "echo", "zoo-lora-flip": "flip",
         "zoo-ft-newtoken": "newtoken"}


@pytest.fixture(scope="module")
def cycle(localhub, zoo, tmp_path_factory):
    """carol's four fine-tunes of safeguard/zoo-base-it (flip opted in); one bot cycle, twice."""
    directory, _ = zoo
    localhub.add_user("carol", "hf_carol_token")
    localhub.add_user("safeguard-bot", "hf_bot_token")
    alice = HfApi(endpoint=localhub.url, token="hf_alice_token")
    carol = HfApi(endpoint=localhub.url, token="hf_carol_token")
    shas = seed_zoo(alice, carol, directory, "safeguard", "carol")
    task_files = {f"carol/{name}": str(directory / "prompts" / f"{task}_heldout.jsonl")
                  for name, task in TASKS.items()}
    workdir = tmp_path_factory.mktemp("work")
    args = ["--config", str(ROOT / "bot" / "zoo" / "evaluate.toml"),
            "--set", "watch.bases=safeguard/zoo-base-it",
            "--set", f"evaluate.task_files={json.dumps(task_files)}"]
    env = {**os.environ, **localhub.env("hf_bot_token")}

    def run_once():
        out = subprocess.run([sys.executable, "-m", "bot.cli", "run", "--once", "--workdir",
                              str(workdir), "--json", *args], capture_output=True, text=True,
                             env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    first = run_once()
    second = run_once()
    return localhub, shas, workdir, first, second


def test_the_opted_in_fine_tune_gets_exactly_one_pull_request(cycle):
    hub, shas, _, first, second = cycle
    api = HfApi(endpoint=hub.url, token="hf_carol_token")
    prs = [d for d in api.get_repo_discussions("carol/zoo-ft-flip")
           if d.is_pull_request]
    assert len(prs) == 1 and prs[0].author == "safeguard-bot" and prs[0].status == "open"
    files = api.list_repo_files("carol/zoo-ft-flip", revision=prs[0].git_reference)
    assert "sweep.png" in files and any(f.endswith(".safetensors") for f in files)
    readme = Path(hf_hub_download("carol/zoo-ft-flip", "README.md", endpoint=hub.url,
                                  revision=prs[0].git_reference)).read_text()
    assert "<!-- safeguard-bot:start -->" in readme and "# zoo-ft-flip" in readme
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["base_model"] == "safeguard/zoo-base-it"  # the owner's metadata is untouched
    flip = next(p for p in first["processed"] if p["repo"] == "carol/zoo-ft-flip")
    assert flip["decision"] == "pull-request" and flip["status"] == "published"
    assert flip["revision"] == shas["carol/zoo-ft-flip"]
    # the second cycle found nothing new, so no second pull request
    assert second["candidates"] == [] and second["processed"] == []


def test_the_others_get_variants_with_cards(cycle):
    hub, _, _, first, _ = cycle
    decisions = {p["repo"]: p["decision"] for p in first["processed"]}
    assert decisions == {"carol/zoo-ft-flip": "pull-request", "carol/zoo-ft-echo": "variant",
                         "carol/zoo-lora-flip": "variant", "carol/zoo-ft-newtoken": "variant"}
    api = HfApi(endpoint=hub.url, token="hf_bot_token")
    for name in ("zoo-ft-echo", "zoo-lora-flip", "zoo-ft-newtoken"):
        repo = f"safeguard-bot/carol__{name}-safeguarded"
        files = set(api.list_repo_files(repo))
        assert {"README.md", "sweep.png", "config.json", "tokenizer.json"} <= files, files
        card = ModelCard(Path(hf_hub_download(repo, "README.md", endpoint=hub.url)).read_text())
        assert card.data.base_model == ["safeguard/zoo-base-it", f"carol/{name}"]
        assert card.data.base_model_relation == "merge"
        assert {r.metric_type for r in card.data.eval_results} >= {"attack_success_rate"}
        assert "base_model:merge:safeguard/zoo-base-it" in api.model_info(repo).tags


def test_the_published_variant_behaves_as_the_sweep_measured(cycle, zoo):
    """Download the variant and evaluate it: the selected point's numbers, reproduced."""
    hub, _, _, first, _ = cycle
    echo = next(p for p in first["processed"] if p["repo"] == "carol/zoo-ft-echo")
    path = snapshot_download("safeguard-bot/carol__zoo-ft-echo-safeguarded", endpoint=hub.url)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    settings = load_settings(ROOT / "bot" / "zoo" / "evaluate.toml", [
        f"evaluate.task_file={zoo[0] / 'prompts' / 'echo_heldout.jsonl'}"])
    point = Evaluator(settings.evaluate).measure(model, tok, echo["selection"]["weight"])
    assert point.asr == echo["asr"]["merged"]
    asr = echo["asr"]
    assert asr["finetune"] - asr["merged"] >= \
        bars.MERGE_MIN_SAFETY_BACK * (asr["finetune"] - asr["base"])


def test_the_feed(cycle):
    hub, _, workdir, first, _ = cycle
    path = hf_hub_download("safeguard-bot/safeguard-results", "results.jsonl",
                           repo_type="dataset", endpoint=hub.url)
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    assert sorted(r["repo"] for r in rows) == sorted(p["repo"] for p in first["processed"])
    assert all(r["asr_merged"] is not None and r["weight"] for r in rows)
    local = workdir / "feed"
    assert (local / "results.jsonl").read_text().count("\n") == 4
    assert "<feed" in (local / "feed.atom").read_text()
    assert "carol/zoo-ft-echo" in (local / "leaderboard.html").read_text()
