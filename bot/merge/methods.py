"""Merge methods as pure tensor maths: one base tensor and one fine-tune tensor in, one out.

Convention (BACKGROUND.md): `weight` is lambda, the weight of the fine-tune; weight 0 gives the
base and weight 1 the fine-tune. The maths is float32: inputs are upcast, except where a method
is marked `float32_inside`. Each method matches mergekit's
method of the same name for a two-model merge with the fine-tune's weight and `normalize: false`.
With a single fine-tune the TIES sign election keeps every surviving entry, so `ties` is a trim
then a scaled add and `dare_ties` equals `dare_linear`; they keep their own names because they
part ways as soon as several fine-tunes are merged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bot.errors import UsageError

SLERP_DOT_THRESHOLD = 0.9995  # above this |cos| the tensors are near-parallel: interpolate linearly
SLERP_EPS = 1e-8


@dataclass(frozen=True)
class MergeParams:
    """What a method needs besides the two tensors."""

    weight: float
    density: float = 1.0
    generator: torch.Generator | None = None


MethodFn = Callable[[torch.Tensor, torch.Tensor, MergeParams], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    `elementwise` methods may be applied to row chunks of a tensor; the others need the whole
    tensor (a norm, a magnitude rank or a random stream over all of it). `float32_inside`
    methods give bit-identical results on bf16/fp16 inputs without upcasting them first,
    because torch's kernel computes in float32 itself and rounds once (tested).
    `uses_density` methods take `--density`; `seeded` ones draw random masks from `--seed`.
    `keeps_adapter_form` methods are linear in the task vector, so merging a LoRA adapter
    gives an adapter again (lora_B scaled by the weight): the `--as-adapter` fast path.
    """

    name: str
    fn: MethodFn
    elementwise: bool
    uses_density: bool = False
    seeded: bool = False
    float32_inside: bool = False
    keeps_adapter_form: bool = False


def linear(base: torch.Tensor, ft: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """(1 - w) * base + w * ft."""
    return torch.lerp(base, ft, p.weight)


def task_arithmetic(base: torch.Tensor, ft: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """base + w * (ft - base): the task vector, scaled. Equal to linear for one fine-tune."""
    return base + p.weight * (ft - base)


def slerp(base: torch.Tensor, ft: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """Spherical interpolation over the whole tensor at t = w; linear when near-parallel."""
    if base.numel() == 0:
        return base.clone()
    norm_b = torch.linalg.vector_norm(base)
    norm_f = torch.linalg.vector_norm(ft)
    norm_b = norm_b if norm_b > SLERP_EPS else torch.ones_like(norm_b)
    norm_f = norm_f if norm_f > SLERP_EPS else torch.ones_like(norm_f)
    dot = ((base / norm_b) * (ft / norm_f)).sum().clamp(-1, 1)
    t = p.weight
    if dot.abs() > SLERP_DOT_THRESHOLD:
        return torch.lerp(base, ft, t)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * base + (torch.sin(t * theta) / sin_theta) * ft


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` share of entries by magnitude (at least one), zero the rest."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator | None):
    """DARE: drop each entry with probability 1 - density, rescale survivors by 1 / density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return delta * keep / density


def ties(base: torch.Tensor, ft: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """base + w * trim(ft - base): TIES with one fine-tune (sign election keeps all survivors)."""
    return base + p.weight * trim_by_magnitude(ft - base, p.density)


def dare_linear(base: torch.Tensor, ft: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """base + w * dare(ft - base)."""
    return base + p.weight * drop_and_rescale(ft - base, p.density, p.generator)


def dare_ties(base: torch.Tensor, ft: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """DARE with TIES sign election; with one fine-tune the election keeps all survivors."""
    return dare_linear(base, ft, p)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", linear, elementwise=True, float32_inside=True,
               keeps_adapter_form=True),
        Method("slerp", slerp, elementwise=False),
        Method("task_arithmetic", task_arithmetic, elementwise=True, keeps_adapter_form=True),
        Method("ties", ties, elementwise=False, uses_density=True),
        Method("dare_linear", dare_linear, elementwise=False, uses_density=True, seeded=True),
        Method("dare_ties", dare_ties, elementwise=False, uses_density=True, seeded=True),
    )
}


def method_named(name: str) -> Method:
    """The registered method called `name`; a UsageError listing the choices if none is."""
    method = METHODS.get(name)
    if method is None:
        raise UsageError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return method


def names_where(flag: str) -> str:
    """The methods with `flag` set, as a phrase: "ties, dare_linear and dare_ties"."""
    names = [m.name for m in METHODS.values() if getattr(m, flag)]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
