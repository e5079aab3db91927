"""The embedded default: the whole bot on this machine, with no network.

Builds the zoo (cached), starts the local hub (bot/localhub) on a free loopback port with its
data in WORKDIR/hub, seeds it as a Hub would look: `safeguard/zoo-base-it` (a safety-aligned
base), four fine-tunes of it by `carol` (zoo-ft-flip opted in with the `safeguard` tag) and
decoys that must be skipped, then runs one watch cycle as the `safeguard-bot` account. Seeding
is idempotent (the same files make no new commit) and the ledger lives in WORKDIR/bot, so a
second run finds nothing new and publishes nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bot.config import load_settings

ZOO_SETTINGS = Path(__file__).resolve().parent / "zoo" / "evaluate.toml"
BOT = ("safeguard-bot", "hf_safeguard_bot_demo_token")
BASE_OWNER = ("alice", "hf_alice_demo_token", "safeguard")
FT_OWNER = ("carol", "hf_carol_demo_token")
TASKS = {"zoo-ft-flip": "flip", "zoo-ft-echo": "echo", "zoo-lora-flip": "flip",
         "zoo-ft-newtoken": "newtoken"}
SIZE_LIMIT_GB = 0.005  # the zoo's models are ~3 MB; the big decoy is 6 MB


@contextmanager
def pointed_at(url: str, token: str) -> Iterator[None]:
    """The Hub client pointed at `url` with `token` for the duration (env and import-time
    constants), restored afterwards."""
    from huggingface_hub import constants

    saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_TOKEN",
                                                "HF_HUB_DISABLE_XET")}
    saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET)
    os.environ.update(HF_ENDPOINT=url, HF_TOKEN=token, HF_HUB_DISABLE_XET="1")
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_demo(workdir: Path, zoo_dir: Path | None = None,
             log: Callable[[str], None] = lambda _: None) -> dict:
    """Build, serve, seed, run one cycle; returns the cycle's result with the demo's facts."""
    from huggingface_hub import HfApi

    from bot.localhub import LocalHub
    from bot.pipeline import run_once
    from bot.zoo.build import build_zoo
    from bot.zoo.seed import seed_decoys, seed_zoo

    started = time.perf_counter()
    workdir = Path(workdir)
    zoo_dir = Path(zoo_dir or workdir / "zoo")
    log(f"zoo: {zoo_dir} (built once, then cached)")
    zoo = build_zoo(zoo_dir, log=log)
    hub = LocalHub(workdir / "hub").start(port=0)
    try:
        for name, token, *orgs in (BOT, BASE_OWNER, FT_OWNER):
            hub.add_user(name, token, orgs=orgs)
        log(f"local hub at {hub.url}, data in {workdir / 'hub'}")
        with pointed_at(hub.url, BOT[1]):
            base_owner = HfApi(endpoint=hub.url, token=BASE_OWNER[1])
            ft_owner = HfApi(endpoint=hub.url, token=FT_OWNER[1])
            base = f"{BASE_OWNER[2]}/zoo-base-it"
            seed_zoo(base_owner, ft_owner, zoo_dir, BASE_OWNER[2], FT_OWNER[0])
            decoys = seed_decoys(ft_owner, zoo_dir, base, FT_OWNER[0], 6_000_000)
            log(f"seeded {base}, 4 fine-tunes by {FT_OWNER[0]} (zoo-ft-flip opted in) and "
                f"{len(decoys)} decoys")
            task_files = {f"{FT_OWNER[0]}/{name}": str(zoo_dir / "prompts" /
                                                       f"{task}_heldout.jsonl")
                          for name, task in TASKS.items()}
            settings = load_settings(ZOO_SETTINGS, [
                f"watch.bases={base}", f"watch.max_model_gb={SIZE_LIMIT_GB}",
                f"evaluate.task_files={json.dumps(task_files)}"])
            result = run_once(settings, workdir / "bot", log=log)
    finally:
        hub.stop()
    return {**result, "hub": str(workdir / "hub"), "zoo_cached": zoo["cached"],
            "total_seconds": round(time.perf_counter() - started, 1)}
