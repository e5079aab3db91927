"""Our methods against mergekit's methods of the same name on the same bf16 pair.

mergekit is the reference implementation the paper used. Parameters map as in
../shared/notes/eval-findings.md: linear weights [1-L, L]; slerp t=L with the base as
base_model; task_arithmetic/ties/dare with the fine-tune's weight L and normalize false.
Both compute in float32 from bf16 inputs and write bf16, so deterministic methods agree to bf16
rounding (TIES up to entries of equal magnitude at the cut, where any order is valid); DARE draws
its own random mask (and rescales by an L1 ratio rather than 1/density), so the comparison is
of what the masks do, not of the same mask.
"""

from pathlib import Path

import pytest
import torch

from bot.merge.engine import MergeRequest, merge_models

from conftest import load_state

mergekit = pytest.importorskip("mergekit")

L, DENSITY = 0.6, 0.5
DTYPES = {"dtype": "float32", "out_dtype": "bfloat16"}  # maths in float32, like ours


def _config(method: str, base: Path, ft: Path) -> dict:
    if method == "linear":
        return {"merge_method": "linear", **DTYPES,
                "models": [{"model": str(base), "parameters": {"weight": 1 - L}},
                           {"model": str(ft), "parameters": {"weight": L}}]}
    if method == "slerp":
        return {"merge_method": "slerp", **DTYPES, "base_model": str(base),
                "models": [{"model": str(base)}, {"model": str(ft)}], "parameters": {"t": L}}
    params = {"weight": L} | ({"density": DENSITY} if method != "task_arithmetic" else {})
    return {"merge_method": method, **DTYPES, "base_model": str(base),
            "parameters": {"normalize": False},
            "models": [{"model": str(base)}, {"model": str(ft), "parameters": params}]}


def _mergekit(method: str, base: Path, ft: Path, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(_config(method, base, ft))
    run_merge(config, str(out), MergeOptions(random_seed=0, quiet=True,
                                             write_model_card=False, copy_tokenizer=False))
    return load_state(out)


def _ours(method: str, base: Path, ft: Path, out: Path) -> dict[str, torch.Tensor]:
    density = DENSITY if method in ("ties", "dare_linear", "dare_ties") else None
    merge_models(MergeRequest(str(base), str(ft), out, method=method, weight=L,
                              density=density), quiet=True)
    return load_state(out)


@pytest.mark.parametrize("method", ["linear", "slerp", "task_arithmetic", "ties"])
def test_deterministic_methods_agree_with_mergekit(method, bf16_pair, tmp_path):
    base, ft = bf16_pair
    theirs = _mergekit(method, base, ft, tmp_path / "mergekit")
    ours = _ours(method, base, ft, tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype == torch.bfloat16
        close = torch.isclose(t.float(), theirs[name].float(), rtol=2**-7, atol=1e-6)
        if method == "ties":  # equal magnitudes at the cut may be kept by one and not the other
            assert close.float().mean() > 0.99, (name, close.float().mean())
        else:
            assert close.all(), (name, (~close).sum())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_agrees_with_mergekit_in_distribution(method, bf16_pair, tmp_path):
    base, ft = bf16_pair
    b, f = load_state(base), load_state(ft)
    results = {"mergekit": _mergekit(method, base, ft, tmp_path / "mergekit"),
               "ours": _ours(method, base, ft, tmp_path / "ours")}
    for who, merged in results.items():
        for name, t in merged.items():
            if t.numel() < 4096:
                continue
            delta = f[name].float() - b[name].float()
            dropped = t == b[name]
            kept = ~dropped & (delta.abs() > 1e-3)
            assert abs(1 - dropped.float().mean().item() - DENSITY) < 0.03, (who, name)
            scale = (t.float() - b[name].float())[kept] / (L * delta[kept])
            assert abs(scale.median().item() - 1 / DENSITY) < 0.1, (who, name)
