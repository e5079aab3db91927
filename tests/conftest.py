"""Shared fixtures: tiny random Llama checkpoints in HF layout, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, through the safetensors library (the reference reader)."""
    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(file))
    return state


ZOO_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "zoo"


@pytest.fixture(scope="session")
def zoo():
    """The zoo, built once into .cache/zoo and reused while its recipe is unchanged:
    (directory, report)."""
    from bot.zoo.build import build_zoo

    return ZOO_CACHE, build_zoo(ZOO_CACHE)


def act_as(monkeypatch, hub, token: str) -> None:
    """Point the in-process Hub client at local hub `hub` with `token` (undone by
    `monkeypatch`)."""
    for key, value in hub.env(token).items():
        monkeypatch.setenv(key, value)


def sweet_spot(report: dict, name: str) -> float:
    """The lambda of the zoo's curve for fine-tune `name` with the most room on both merge bars
    (bot/zoo/bars.py): where this machine's zoo has its sweet spot, never a constant."""
    from bot.zoo import bars

    models = report["models"]
    base, ft = models["zoo-base-it"], models[name]
    key = f"task_{ft['task']}"
    best = max(ft["curve"], key=lambda p: bars.merge_slack(base, ft, p, key))
    assert bars.merge_slack(base, ft, best, key) >= 0, f"{name} has no sweet spot on its curve"
    return best["weight"]


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """float32 base in one file, fine-tune in five shards."""
    from bot.zoo.random_models import random_pair

    return random_pair(tmp_path_factory.mktemp("pair"), ft_shards="100KB")


@pytest.fixture(scope="session")
def bf16_pair(tmp_path_factory):
    """bfloat16 base in three shards, fine-tune in two: shard boundaries differ."""
    from bot.zoo.random_models import random_pair, tiny_config

    return random_pair(tmp_path_factory.mktemp("bf16"), tiny_config(hidden=96, intermediate=192),
                       seed=1, dtype=torch.bfloat16, base_shards="100KB", ft_shards="200KB")


def _loopback_only(request) -> None:
    """httpx request hook: let huggingface_hub reach 127.0.0.1 only (the local hub)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if request.url.host not in ("127.0.0.1", "localhost", "::1"):
        raise OfflineModeIsEnabled(f"Cannot reach {request.url}: the tests only reach the local "
                                   "hub on 127.0.0.1")


@pytest.fixture(scope="session")
def localhub(tmp_path_factory):
    """A LocalHub (bot/localhub) serving a fresh directory on a free 127.0.0.1 port.

    Users: `alice` (token `hf_alice_token`, member of the org `safeguard`) and `bob` (token
    `hf_bob_token`). Use it with `HfApi(endpoint=localhub.url, token="hf_alice_token")`, or
    set HF_ENDPOINT to `localhub.url` (bot/hub.py reads it at each call); for a subprocess,
    pass `{**os.environ, **localhub.env("hf_alice_token")}` as its environment. The hub is
    shared by the whole session: give your repos names of your own.

    Offline mode: this conftest sets HF_HUB_OFFLINE=1, which huggingface_hub reads once at
    import into `huggingface_hub.constants.HF_HUB_OFFLINE`; with it every request fails before
    it is sent. For the rest of the session this fixture sets that constant to False and
    installs an HTTP client whose first hook refuses every host but 127.0.0.1, so the tests
    still cannot reach huggingface.co (they fail at once with OfflineModeIsEnabled) but reach
    the local hub. Xet is not supported by the local hub, so `constants.HF_HUB_DISABLE_XET`
    (also read at import) is set to True and HF_HUB_DISABLE_XET=1 exported. Everything is
    restored when the session ends (bot/hub.py `client_settings`). The environment variable
    HF_HUB_OFFLINE stays "1" for subprocesses; `localhub.env()` overrides it.
    """
    import huggingface_hub
    from huggingface_hub.utils._http import default_client_factory

    from bot.hub import client_settings
    from bot.localhub import LocalHub

    def client_factory():
        client = default_client_factory()
        client.event_hooks = {"request": [_loopback_only, *client.event_hooks["request"]],
                              "response": client.event_hooks["response"]}
        return client

    huggingface_hub.set_client_factory(client_factory)
    hub = LocalHub(tmp_path_factory.mktemp("localhub")).start(port=0)
    hub.add_user("alice", "hf_alice_token", orgs=["safeguard"])
    hub.add_user("bob", "hf_bob_token")
    try:
        with client_settings(offline=False, xet=False):
            yield hub
    finally:
        hub.stop()
        huggingface_hub.set_client_factory(default_client_factory)
