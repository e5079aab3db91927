"""LoRA adapters (PEFT layout) seen as fine-tunes: base weight + scaled low-rank delta.

An adapter repo holds adapter_config.json and adapter_model.safetensors with lora_A/lora_B
pairs per module, and possibly full tensors (modules_to_save, trained biases) that replace the
base's. `AdapterCheckpoint` presents base + adapter with the same interface as `Checkpoint`,
so the merge engine treats it like any other fine-tune.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bot.errors import CheckpointError, IncompatibleModelsError, PickleRefusedError
from bot.merge.checkpoint import Checkpoint, TensorInfo, read_header, read_tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.weight)?$")


def is_adapter(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).exists()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name's suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: delta = scaling * B @ A (transposed for embeddings / fan_in_fan_out)."""

    target: str  # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    a: TensorInfo
    b: TensorInfo
    scaling: float
    transpose: bool

    def delta(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The float32 delta, or rows [start, stop) of it."""
        a = read_tensor(self.a).float()
        b = read_tensor(self.b).float()
        if self.transpose:
            if rows is not None:
                a = a[:, rows[0]:rows[1]]
            return (b @ a).T * self.scaling
        if rows is not None:
            b = b[rows[0]:rows[1]]
        return (b @ a) * self.scaling


class AdapterCheckpoint:
    """A base checkpoint with a LoRA adapter applied, read lazily like a `Checkpoint`."""

    def __init__(self, base: Checkpoint, directory: Path):
        self.base = base
        self.directory = Path(directory)
        self.config = self._read_config()
        self.modules, self.replaced = self._read_weights()
        self.tensors = dict(base.tensors)  # the adapter changes values, not the tensor set

    def _read_config(self) -> dict:
        try:
            config = json.loads((self.directory / ADAPTER_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.directory / ADAPTER_CONFIG}: not valid JSON ({e})") \
                from None
        if config.get("peft_type", "LORA") != "LORA":
            raise IncompatibleModelsError(
                f"{self.directory}: a {config.get('peft_type')} adapter; only LoRA adapters "
                "can be merged")
        if config.get("use_dora"):
            raise IncompatibleModelsError(
                f"{self.directory}: a DoRA adapter; its magnitude vectors make the merge "
                "non-linear, so it is not supported")
        return config

    def _read_weights(self) -> tuple[dict[str, LoraModule], dict[str, TensorInfo]]:
        file = self.directory / ADAPTER_WEIGHTS
        if not file.exists():
            if (self.directory / "adapter_model.bin").exists():
                raise PickleRefusedError(
                    f"{self.directory}: the adapter is only in pickle format (adapter_model.bin);"
                    " pickle files can run code when loaded, so they are refused")
            raise CheckpointError(f"{self.directory}: no {ADAPTER_WEIGHTS}")
        parts: dict[str, dict[str, TensorInfo]] = {}
        embeddings: set[str] = set()
        replaced: dict[str, TensorInfo] = {}
        for key, info in read_header(file).items():
            name = key.removeprefix(PEFT_PREFIX)
            match = _LORA_KEY.match(name)
            if match:
                parts.setdefault(match["module"], {})["lora_" + match["part"][-1]] = info
                if "embedding" in match["part"]:
                    embeddings.add(match["module"])
            else:
                # modules_to_save copies, trained biases, or embeddings saved whole
                plain = name.replace(".modules_to_save.default", "").replace(".base_layer", "")
                replaced[plain] = info
        modules = {}
        cfg = self.config
        for module, p in parts.items():
            if "lora_A" not in p or "lora_B" not in p:
                raise CheckpointError(f"{file}: module {module} lacks its lora_A or lora_B")
            rank = p["lora_A"].shape[0]
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module,
                                   cfg.get("lora_alpha", rank))
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            target = f"{module}.weight"
            transpose = module in embeddings or bool(cfg.get("fan_in_fan_out"))
            modules[target] = LoraModule(target, p["lora_A"], p["lora_B"], scaling, transpose)
        for target, mod in modules.items():
            self._check_target(target, (mod.b.shape[0], mod.a.shape[1]) if not mod.transpose
                               else (mod.a.shape[1], mod.b.shape[0]))
        for target, info in replaced.items():
            self._check_target(target, info.shape)
        return modules, replaced

    def _check_target(self, target: str, shape: tuple[int, ...]) -> None:
        base_info = self.base.tensors.get(target)
        if base_info is None:
            raise IncompatibleModelsError(
                f"{self.directory}: the adapter changes {target}, which the base does not have")
        if tuple(base_info.shape) != tuple(shape):
            raise IncompatibleModelsError(
                f"{self.directory}: the adapter's {target} has shape {list(shape)}, the base's "
                f"is {list(base_info.shape)}")

    def changed(self, name: str) -> bool:
        return name in self.modules or name in self.replaced

    def read(self, name: str, rows: tuple[int, int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The fine-tuned tensor: the base's (or the adapter's copy) plus the LoRA delta."""
        replaced = self.replaced.get(name)
        start = read_tensor(replaced, rows, out) if replaced else self.base.read(name, rows, out)
        if name not in self.modules:
            return start
        return start.float() + self.modules[name].delta(rows)
