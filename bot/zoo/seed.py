"""Seed a Hub (the local one) with the zoo and decoys: what discovery must find and must skip.

Models are uploaded with the real client. Cards name their base by its Hub id, so the Hub
derives the `base_model:finetune:` / `base_model:adapter:` tags discovery lists by. One
fine-tune carries the opt-in tag. Decoys each break one rule: pickle-only weights, a GGUF file,
another architecture, remote code, a no-derivatives license, a size over the limit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from bot.config import OPT_IN_TAG


def card(base: str | None, tags: list[str], license_id: str = "apache-2.0",
         title: str = "model", relation: str | None = None) -> str:
    meta = {"license": license_id, "tags": tags, "library_name": "transformers"}
    if base:
        meta["base_model"] = base
    if relation:  # else the Hub infers it (adapter_config.json: adapter, GGUF: quantized...)
        meta["base_model_relation"] = relation
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {title}\n"


def upload(api, repo: str, folder: Path, readme: str, private: bool = False) -> str:
    """Create `repo` and upload `folder` with `readme` as its card in one commit; its sha."""
    api.create_repo(repo, exist_ok=True, private=private)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "repo"
        shutil.copytree(folder, staged)
        (staged / "README.md").write_text(readme)
        info = api.upload_folder(repo_id=repo, folder_path=staged,
                                 commit_message=f"upload {folder.name}")
    return info.oid


def seed_zoo(api_base, api_owner, zoo: Path, base_owner: str, owner: str) -> dict[str, str]:
    """The base under `base_owner`, the fine-tunes under `owner` (zoo-ft-flip opted in).

    `api_base` / `api_owner` are HfApi clients with each owner's token. Returns repo -> sha.
    """
    base = f"{base_owner}/zoo-base-it"
    shas = {base: upload(api_base, base, zoo / "zoo-base-it",
                         card(None, ["safety-aligned"], title="zoo-base-it"))}
    for name, tags in [("zoo-ft-flip", [OPT_IN_TAG]), ("zoo-ft-echo", []),
                       ("zoo-lora-flip", ["lora"]), ("zoo-ft-newtoken", [])]:
        repo = f"{owner}/{name}"
        shas[repo] = upload(api_owner, repo, zoo / name, card(base, ["fine-tune", *tags],
                                                              title=name))
    return shas


def seed_decoys(api, zoo: Path, base: str, owner: str, big_bytes: int) -> dict[str, str]:
    """Repos that declare `base` but must be skipped; returns repo -> the expected reason."""
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ft = zoo / "zoo-ft-echo"

        def variant(name: str, reason: str, edit, license_id: str = "apache-2.0") -> None:
            folder = root / name
            shutil.copytree(ft, folder, ignore=shutil.ignore_patterns("README.md"))
            edit(folder)
            upload(api, f"{owner}/{name}", folder,
                   card(base, ["fine-tune"], license_id, name, relation="finetune"))
            expected[f"{owner}/{name}"] = reason

        def to_pickle(folder: Path) -> None:
            for f in folder.glob("*.safetensors"):
                f.rename(f.with_name("pytorch_model.bin"))

        def to_gguf(folder: Path) -> None:
            for f in folder.glob("*.safetensors"):
                f.unlink()
            (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(64))

        def edit_config(**changes):
            def edit(folder: Path) -> None:
                config = json.loads((folder / "config.json").read_text())
                config.update(changes)
                (folder / "config.json").write_text(json.dumps(config, indent=2))
            return edit

        def grow(folder: Path) -> None:
            (folder / "extra.safetensors").write_bytes(_safetensors_blob(big_bytes))

        variant("decoy-pickle", "only pickle weights", to_pickle)
        variant("decoy-gguf", "quantized (GGUF)", to_gguf)
        variant("decoy-arch", "architecture differs",
                edit_config(model_type="mistral", architectures=["MistralForCausalLM"]))
        variant("decoy-remote-code", "needs remote code",
                edit_config(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
        variant("decoy-nd-license", "forbids derivatives", lambda f: None, "cc-by-nd-4.0")
        variant("decoy-big", "larger than the size limit", grow)
    return expected


def seed_owners(api_for, zoo: Path, base: str, owner: str, other: str, lab: str
                ) -> dict[str, str]:
    """What owners' wishes and names decide: a private fine-tune in `lab` (an organisation the
    bot belongs to, so it can read it), an opted-out one, `other`'s fine-tune with the same
    name as `owner`'s zoo-ft-echo, and `other`'s fine-tune of a quantized copy of `base`.
    `api_for(account)` is an HfApi with that account's token. Returns repo -> what the bot
    must do with it."""
    def put(repo: str, model: str, meta_base: str, tags=(), relation="finetune",
            private=False, config: dict | None = None, account: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / model
            shutil.copytree(zoo / model, folder, ignore=shutil.ignore_patterns("README.md"))
            if config:
                path = folder / "config.json"
                path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
            upload(api_for(account or repo.split("/")[0]), repo, folder,
                   card(meta_base, ["fine-tune", *tags], title=repo.split("/")[1],
                        relation=relation), private=private)

    copy = f"{other}/zoo-base-it-bnb-4bit"  # people fine-tune from such copies
    put(f"{lab}/zoo-ft-private", "zoo-ft-echo", base, private=True, account=owner)
    put(f"{owner}/zoo-ft-opted-out", "zoo-ft-echo", base, tags=["safeguard-opt-out"])
    put(f"{other}/zoo-ft-echo", "zoo-ft-echo", base)
    put(copy, "zoo-base-it", base, relation="quantized",
        config={"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    put(f"{other}/zoo-ft-flip-4bit", "zoo-ft-flip", copy)
    return {f"{lab}/zoo-ft-private": "skipped: private",
            f"{owner}/zoo-ft-opted-out": "skipped: opted out",
            f"{other}/zoo-ft-echo": "a variant of its own, beside "
                                    f"{owner}/zoo-ft-echo's",
            f"{other}/zoo-ft-flip-4bit": f"a candidate of {base}, found through {copy}"}


def _safetensors_blob(size: int) -> bytes:
    """A valid safetensors file holding one uint8 tensor of `size` bytes."""
    header = json.dumps({"filler": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    header_bytes = header.encode() + b" " * (-len(header) % 8)
    return len(header_bytes).to_bytes(8, "little") + header_bytes + bytes(size)
