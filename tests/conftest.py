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
