"""Each merge method against a direct torch reference of its definition."""

import math

import pytest
import torch

from bot.merge.methods import METHODS, MergeParams, slerp, trim_by_magnitude


def _tensors(seed=0, shape=(64, 32)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, base + 0.3 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("w", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_linear_and_task_arithmetic(w):
    base, ft = _tensors()
    expected = (1 - w) * base + w * ft
    for name in ("linear", "task_arithmetic"):
        got = METHODS[name].fn(base, ft, MergeParams(w))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_linear_endpoints_are_exact():
    base, ft = _tensors()
    assert torch.equal(METHODS["linear"].fn(base, ft, MergeParams(0.0)), base)
    assert torch.equal(METHODS["linear"].fn(base, ft, MergeParams(1.0)), ft)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.7])
def test_slerp_matches_spherical_formula(t):
    base, ft = _tensors(1)
    b, f = base.double().flatten(), ft.double().flatten()
    omega = math.acos((b @ f / (b.norm() * f.norm())).item())
    expected = (math.sin((1 - t) * omega) * b + math.sin(t * omega) * f) / math.sin(omega)
    got = slerp(base, ft, MergeParams(t))
    torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-5, atol=1e-5)


def test_slerp_falls_back_to_linear_when_parallel():
    base = torch.randn(100)
    ft = base * 2.0  # parallel: the angle is zero
    torch.testing.assert_close(slerp(base, ft, MergeParams(0.3)), torch.lerp(base, ft, 0.3))


def test_ties_keeps_top_density_share_by_magnitude():
    base, ft = _tensors(2, (50, 40))
    delta = ft - base
    got = METHODS["ties"].fn(base, ft, MergeParams(0.6, density=0.25))
    k = int(0.25 * delta.numel())
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    kept = delta.abs() >= threshold
    expected = base + 0.6 * torch.where(kept, delta, torch.zeros_like(delta))
    torch.testing.assert_close(got, expected)
    assert int(kept.sum()) == k
    assert torch.equal(trim_by_magnitude(delta, 1.0), delta)
    assert int((trim_by_magnitude(delta, 1e-9) != 0).sum()) == 1  # at least one survives


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales(name):
    base, ft = _tensors(3, (400, 250))
    delta = ft - base
    density, w = 0.3, 0.7
    got = METHODS[name].fn(base, ft, MergeParams(w, density, torch.Generator().manual_seed(5)))
    dropped = got == base  # a dropped entry adds exactly zero
    assert abs(1 - dropped.float().mean().item() - density) < 0.01
    rescaled = base + w * delta / density
    torch.testing.assert_close(got[~dropped], rescaled[~dropped])
    again = METHODS[name].fn(base, ft, MergeParams(w, density, torch.Generator().manual_seed(5)))
    assert torch.equal(got, again)
    other = METHODS[name].fn(base, ft, MergeParams(w, density, torch.Generator().manual_seed(6)))
    assert not torch.equal(got, other)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_return_fresh_tensors(name):
    """The engine reuses its input buffers: a method must never hand one back."""
    base, ft = _tensors(4)
    for w in (0.0, 0.5, 1.0):
        out = METHODS[name].fn(base, ft, MergeParams(w, 1.0, torch.Generator().manual_seed(0)))
        ptr = out.untyped_storage().data_ptr()
        assert ptr not in (base.untyped_storage().data_ptr(), ft.untyped_storage().data_ptr())
