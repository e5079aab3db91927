"""Merges written into a loaded model's parameters, for sweeping lambda without checkpoints.

The maths is the engine's: the same method functions, the same float32 upcast rule, the same
per-tensor random generator for the seeded methods, so the merge evaluated at a lambda is the
merge `safeguard-bot merge` writes at that lambda. Rows a grown vocabulary added keep the
fine-tune's values, as in the engine.
"""

from __future__ import annotations

import torch

from bot.errors import IncompatibleModelsError, UsageError
from bot.merge.engine import tensor_generator
from bot.merge.methods import METHODS, MergeParams


class InPlaceMerger:
    """Holds the base's and the fine-tune's tensors; `set_weight` writes their merge into model.

    `model` is the loaded fine-tune; `base_state` the base's state_dict (tied weights appear
    under both names there). Memory: the model plus one copy of each, three models in all.
    """

    def __init__(self, model: torch.nn.Module, base_state: dict[str, torch.Tensor],
                 method: str = "linear", density: float = 0.5, seed: int = 0):
        if method not in METHODS:
            raise UsageError(f"unknown merge method {method!r} ({', '.join(METHODS)})")
        self.model, self.method, self.density, self.seed = model, METHODS[method], density, seed
        self.params = dict(model.named_parameters())
        self.finetune = {n: p.detach().clone() for n, p in self.params.items()}
        self.base = {}
        for name, p in self.params.items():
            b = base_state.get(name)
            if b is None:
                raise IncompatibleModelsError(f"the base has no tensor {name}")
            grown = b.shape[1:] == p.shape[1:] and b.shape[0] < p.shape[0]
            if b.shape != p.shape and not grown:
                raise IncompatibleModelsError(f"{name}: base shape {tuple(b.shape)}, fine-tune "
                                              f"shape {tuple(p.shape)}")
            self.base[name] = b.to(p.device)

    @torch.no_grad()
    def set_weight(self, weight: float) -> None:
        """Write (the method's) merge at lambda = weight into the model's parameters."""
        for name, param in self.params.items():
            b, f = self.base[name], self.finetune[name]
            rows = b.shape[0]
            generator = (tensor_generator(self.seed, name, str(f.device.type))
                         if self.method.seeded else None)
            params = MergeParams(weight, self.density, generator)
            fb, ff = b, f[:rows]
            if not (self.method.float32_inside and fb.dtype == ff.dtype == param.dtype):
                fb, ff = fb.float(), ff.float()
            param[:rows].copy_(self.method.fn(fb, ff, params).to(param.dtype))
            if rows < f.shape[0]:
                param[rows:].copy_(f[rows:])

    @torch.no_grad()
    def restore_finetune(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.finetune[name])
