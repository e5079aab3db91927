"""The embedded default: the whole bot on this machine, with no network.

Builds the zoo (cached), starts the local hub (bot/localhub) on a free loopback port with its
data in WORKDIR/hub, seeds it as a Hub would look: `safeguard/zoo-base-it` (a safety-aligned
base), four fine-tunes of it by `carol` (zoo-ft-flip opted in with the `safeguard` tag),
decoys that must be skipped, and what owners' wishes and names decide (a private fine-tune the
bot can read, an opted-out one, `dave`'s fine-tune named like one of carol's, and dave's
fine-tune of a quantized copy of the base), then runs one watch cycle as the `safeguard-bot`
account. Seeding is idempotent (the same files make no new commit) and the ledger lives in
WORKDIR/bot, so a second run finds nothing new and publishes nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from bot import hub
from bot.config import load_settings
from bot.results import DemoResult


class Account(NamedTuple):
    """A user of the demo's local hub: name, token, and the organisations it belongs to."""

    name: str
    token: str
    orgs: tuple[str, ...] = ()


ZOO_SETTINGS = Path(__file__).resolve().parent / "zoo" / "evaluate.toml"
BOT = Account("safeguard-bot", "hf_safeguard_bot_demo_token")
BASE_OWNER = Account("alice", "hf_alice_demo_token", ("safeguard",))
FT_OWNER = Account("carol", "hf_carol_demo_token", ("carol-lab",))
OTHER_OWNER = Account("dave", "hf_dave_demo_token")
BOT = BOT._replace(orgs=("carol-lab",))  # so it can read that organisation's private repos
TASKS = {"carol/zoo-ft-flip": "flip", "carol/zoo-ft-echo": "echo",
         "carol/zoo-lora-flip": "flip", "carol/zoo-ft-newtoken": "newtoken",
         "dave/zoo-ft-echo": "echo", "dave/zoo-ft-flip-4bit": "flip"}
SIZE_LIMIT_GB = 0.005  # the zoo's models are ~3 MB; the big decoy is 6 MB


def pointed_at(url: str, token: str) -> contextlib.AbstractContextManager[None]:
    """The Hub client pointed at `url` with `token` for the duration (plain HTTP uploads, which
    the local hub takes), restored afterwards."""
    return hub.client_settings(endpoint=url, token=token, offline=False, xet=False)


def run_demo(workdir: Path, zoo_dir: Path | None = None,
             log: Callable[[str], None] = lambda _: None) -> DemoResult:
    """Build, serve, seed, run one cycle; returns the cycle's result with the demo's facts."""
    from huggingface_hub import HfApi

    from bot.localhub import LocalHub
    from bot.pipeline import run_once
    from bot.zoo.build import build_zoo
    from bot.zoo.seed import seed_decoys, seed_owners, seed_zoo

    started = time.perf_counter()
    workdir = Path(workdir)
    zoo_dir = Path(zoo_dir or workdir / "zoo")
    log(f"zoo: {zoo_dir} (built once, then cached)")
    zoo = build_zoo(zoo_dir, log=log)
    local = LocalHub(workdir / "hub").start(port=0)
    try:
        accounts = (BOT, BASE_OWNER, FT_OWNER, OTHER_OWNER)
        for account in accounts:
            local.add_user(account.name, account.token, orgs=list(account.orgs))
        log(f"local hub at {local.url}, data in {workdir / 'hub'}")
        with pointed_at(local.url, BOT.token):
            base_owner = HfApi(endpoint=local.url, token=BASE_OWNER.token)
            ft_owner = HfApi(endpoint=local.url, token=FT_OWNER.token)
            org = BASE_OWNER.orgs[0]
            base = f"{org}/zoo-base-it"
            seed_zoo(base_owner, ft_owner, zoo_dir, org, FT_OWNER.name)
            decoys = seed_decoys(ft_owner, zoo_dir, base, FT_OWNER.name, 6_000_000)
            tokens = {a.name: a.token for a in accounts}
            owners = seed_owners(lambda name: HfApi(endpoint=local.url, token=tokens[name]),
                                 zoo_dir, base, FT_OWNER.name, OTHER_OWNER.name,
                                 FT_OWNER.orgs[0])
            log(f"seeded {base}, 4 fine-tunes by {FT_OWNER.name} (zoo-ft-flip opted in), "
                f"{len(decoys)} decoys, and for owners' wishes and names:")
            for repo, expected in owners.items():
                log(f"  {repo}: {expected}")
            task_files = {repo: str(zoo_dir / "prompts" / f"{task}_heldout.jsonl")
                          for repo, task in TASKS.items()}
            settings = load_settings(ZOO_SETTINGS, [
                f"watch.bases={base}", f"watch.max_model_gb={SIZE_LIMIT_GB}",
                f"evaluate.task_files={json.dumps(task_files)}"])
            result = run_once(settings, workdir / "bot", log=log)
    finally:
        local.stop()
    return DemoResult(result, str(workdir / "hub"), zoo["cached"],
                      round(time.perf_counter() - started, 1))
