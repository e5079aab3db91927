"""Whose model a variant is, what its license allows, and what it carries (issue 13): variants
named after the fine-tune's owner, never published into a repo the bot did not make from that
source, stale shards deleted, license files carried and license rules applied, remote-code
hooks stripped from every copied JSON (and the card says so), only allow-listed files copied.
One cycle on a hub of its own; each test reads what it published."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from bot.config import load_settings
from bot.localhub import LocalHub
from bot.pipeline import run_once
from bot.publish.licenses import variant_name
from bot.zoo.seed import card, upload

from conftest import act_as, sweet_spot

ROOT = Path(__file__).resolve().parent.parent
BOT, BOT_TOKEN = "identity-bot", "hf_identity_bot_token"
BASE = "hank/base-id"
HOOK = {"AutoTokenizer": ["evil--tok.EvilTokenizer", None]}


def readme(base: str, license_id: str, license_name: str | None = None) -> str:
    meta = {"license": license_id, "base_model": base, "base_model_relation": "finetune",
            "tags": ["fine-tune"]}
    if license_name:
        meta["license_name"] = license_name
    return f"---\n{yaml.safe_dump(meta)}---\n\n# a fine-tune\n"


def seed(hub, directory: Path, repo: str, text: str, extra: dict[str, str] = (),
         hooked: bool = False) -> str:
    owner = repo.split("/")[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        shutil.copytree(directory / "zoo-ft-echo", folder)
        for name, content in dict(extra).items():
            (folder / name).write_text(content)
        if hooked:
            path = folder / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "auto_map": HOOK,
                                        "tokenizer_class": "evil--tok.EvilTokenizer"}))
        return upload(HfApi(endpoint=hub.url, token=f"hf_{owner}_token"), repo, folder, text)


@pytest.fixture(scope="module")
def cycle(localhub, zoo, tmp_path_factory):
    """hank's base carries LICENSE and USE_POLICY.md; ivy and jack publish fine-tunes of it,
    two of them with the same name; the bot's account already holds two repos: one a person
    made by hand under a variant's name, one an older variant of the bot's with an extra shard.
    """
    directory, report = zoo
    hub = LocalHub(tmp_path_factory.mktemp("identity-hub")).start()
    for user in ("hank", "ivy", "jack"):
        hub.add_user(user, f"hf_{user}_token")
    hub.add_user(BOT, BOT_TOKEN)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        shutil.copytree(directory / "zoo-base-it", base)
        (base / "LICENSE").write_text("the base's license text\n")
        (base / "USE_POLICY.md").write_text("the base's use policy\n")
        upload(HfApi(endpoint=hub.url, token="hf_hank_token"), BASE, base,
               card(None, ["safety-aligned"], license_id="llama3.1"))
    seed(hub, directory, "ivy/same-name", readme(BASE, "apache-2.0"), hooked=True,
         extra={"LICENSE": "ivy's own license\n", "notes.txt": "not a model file\n",
                "train_args.json": "{}"})
    seed(hub, directory, "jack/same-name", readme(BASE, "mit"))
    seed(hub, directory, "ivy/llama-ft", readme(BASE, "llama3.1"))
    seed(hub, directory, "ivy/qwen-ft", readme(BASE, "other", "qwen"),
         extra={"LICENSE": "the qwen license\n"})
    seed(hub, directory, "ivy/custom-ft", readme(BASE, "other", "my-own-terms"))
    seed(hub, directory, "ivy/taken", readme(BASE, "apache-2.0"))
    seed(hub, directory, "ivy/resharded", readme(BASE, "apache-2.0"))
    me = HfApi(endpoint=hub.url, token=BOT_TOKEN)
    by_hand = variant_name(BOT, "ivy/taken", "apache-2.0")
    me.create_repo(by_hand)
    me.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# my own notes\n",
                   path_in_repo="README.md", repo_id=by_hand)
    older = variant_name(BOT, "ivy/resharded", "apache-2.0")
    me.create_repo(older)
    meta = {"base_model": [BASE, "ivy/resharded"], "tags": ["safeguard-bot"]}
    for path, content in (("README.md", f"---\n{yaml.safe_dump(meta)}---\n# older\n".encode()),
                          ("model-00002-of-00002.safetensors", b"an older shard")):
        me.upload_file(path_or_fileobj=content, path_in_repo=path, repo_id=older)
    workdir = tmp_path_factory.mktemp("identity-bot")
    task = str(directory / "prompts" / "echo_heldout.jsonl")
    repos = ["ivy/same-name", "jack/same-name", "ivy/llama-ft", "ivy/qwen-ft",
             "ivy/custom-ft", "ivy/taken", "ivy/resharded"]
    settings = load_settings(ROOT / "bot" / "zoo" / "evaluate.toml", [
        f"watch.bases={BASE}", f"sweep.grid=[{sweet_spot(report, 'zoo-ft-echo')}]",
        "evaluate.task_files=" + json.dumps({r: task for r in repos}),
        f"publish.feed_repo={BOT}/results"])
    try:
        with pytest.MonkeyPatch.context() as mp:
            act_as(mp, hub, BOT_TOKEN)
            result = run_once(settings, workdir)
            yield hub, me, {o.candidate.repo: o for o in result.processed}
    finally:
        hub.stop()


def card_of(hub, repo: str) -> ModelCard:
    return ModelCard(Path(hf_hub_download(repo, "README.md", endpoint=hub.url)).read_text())


def test_two_owners_of_the_same_name_get_two_variants(cycle):
    hub, me, outcomes = cycle
    for owner in ("ivy", "jack"):
        outcome = outcomes[f"{owner}/same-name"]
        assert outcome.publication.decision == "variant", outcome.reason
        repo = f"{BOT}/{owner}__same-name-safeguarded"
        assert outcome.publication.links["variant"].endswith(repo)
        data = card_of(hub, repo).data
        assert data.base_model == [BASE, f"{owner}/same-name"]
    assert not me.repo_exists(f"{BOT}/same-name-safeguarded")


def test_a_repo_the_bot_did_not_make_is_never_overwritten(cycle):
    hub, me, outcomes = cycle
    outcome = outcomes["ivy/taken"]
    assert outcome.publication.decision == "feed-only"
    assert "not made by safeguard-bot from ivy/taken" in outcome.publication.reason
    repo = f"{BOT}/ivy__taken-safeguarded"
    assert sorted(me.list_repo_files(repo)) == [".gitattributes", "README.md"]
    assert "my own notes" in card_of(hub, repo).text


def test_a_variant_commit_replaces_every_weight_file(cycle):
    hub, me, outcomes = cycle
    assert outcomes["ivy/resharded"].publication.decision == "variant"
    repo = f"{BOT}/ivy__resharded-safeguarded"
    files = set(me.list_repo_files(repo))
    assert "model-00002-of-00002.safetensors" not in files  # the older shard is gone
    assert "model.safetensors" in files
    text = card_of(hub, repo).text
    sha = me.model_info("ivy/resharded").sha
    assert sha in text  # the source revision, in the card


def test_license_files_travel_and_license_rules_apply(cycle):
    hub, me, outcomes = cycle
    # the fine-tune's own LICENSE wins; nothing of the base's is mixed in
    own = f"{BOT}/ivy__same-name-safeguarded"
    assert "LICENSE" in me.list_repo_files(own)
    assert "USE_POLICY.md" not in me.list_repo_files(own)
    assert Path(hf_hub_download(own, "LICENSE", endpoint=hub.url)).read_text() == \
        "ivy's own license\n"
    # none of its own: the base's; Llama 3.1 wants "Llama" first in the name
    llama = f"{BOT}/Llama-ivy__llama-ft-safeguarded"
    assert outcomes["ivy/llama-ft"].publication.links["variant"].endswith(llama)
    assert {"LICENSE", "USE_POLICY.md"} <= set(me.list_repo_files(llama))
    card = card_of(hub, llama)
    assert card.data.license == "llama3.1" and "Built with Llama" in card.text
    # `other` + license_name: the Hub's way of naming Qwen's license
    qwen = card_of(hub, f"{BOT}/ivy__qwen-ft-safeguarded").data
    assert (qwen.license, qwen.license_name, qwen.license_link) == ("other", "qwen", "LICENSE")
    # a license the table does not know: the feed only
    custom = outcomes["ivy/custom-ft"].publication
    assert custom.decision == "feed-only" and "my-own-terms has no rule" in custom.reason
    assert not me.repo_exists(f"{BOT}/ivy__custom-ft-safeguarded")


def test_remote_code_is_stripped_and_only_allow_listed_files_are_copied(cycle):
    hub, me, _ = cycle
    repo = f"{BOT}/ivy__same-name-safeguarded"
    files = set(me.list_repo_files(repo))
    assert not files & {"notes.txt", "train_args.json"}
    tokenizer = json.loads(Path(hf_hub_download(repo, "tokenizer_config.json",
                                                endpoint=hub.url)).read_text())
    assert "auto_map" not in tokenizer and "tokenizer_class" not in tokenizer
    text = card_of(hub, repo).text
    assert "Removed from `tokenizer_config.json`" in text
    assert "`auto_map`" in text.replace("\\_", "_")


def test_variant_names_stay_within_the_hubs_limit_and_apart():
    long_a, long_b = "o" * 40 + "/" + "n" * 90 + "a", "o" * 40 + "/" + "n" * 90 + "b"
    names = {variant_name("bot", r, "apache-2.0") for r in (long_a, long_b)}
    assert len(names) == 2
    for name in names:
        owner, repo = name.split("/")
        assert len(repo) <= 96 and repo.endswith("-safeguarded") and "--" not in repo
    assert variant_name("bot", "ann/Llama-3-x", "llama3").split("/")[1] == \
        "Llama-3-ann__Llama-3-x-safeguarded"
