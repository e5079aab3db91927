"""The merge engine end to end on real HF-layout checkpoints, against torch references."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bot.errors import (
    CheckpointError,
    IncompatibleModelsError,
    MergeError,
    OutputExistsError,
    PickleRefusedError,
    UsageError,
)
from bot.hub import parse_model_ref
from bot.merge.engine import MergeRequest, merge_models
from bot.zoo.random_models import save_model, tiny_config, word_tokenizer

from conftest import load_state

BF16_TOL = {"rtol": 2**-7, "atol": 1e-6}


def _merge(base, ft, out, **kw):
    return merge_models(MergeRequest(str(base), str(ft), Path(out), **kw), quiet=True)


def _reference(name, b, f, w, density=None):
    b, f = b.float(), f.float()
    if name in ("linear", "task_arithmetic"):
        return (1 - w) * b + w * f
    if name == "slerp":
        cos = (b.flatten() @ f.flatten() / (b.norm() * f.norm())).clamp(-1, 1)
        if cos.abs() > 0.9995:
            return (1 - w) * b + w * f
        omega = torch.acos(cos)
        return (torch.sin((1 - w) * omega) * b + torch.sin(w * omega) * f) / torch.sin(omega)
    if name == "ties":
        d = f - b
        k = max(1, int(density * d.numel()))
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().argsort(descending=True)[:k]] = True
        return b + w * d * keep.reshape(d.shape)
    raise AssertionError(name)


def _no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "slerp", "ties"])
def test_methods_match_reference_on_differently_sharded_bf16(method, bf16_pair, tmp_path):
    base, ft = bf16_pair
    assert len(list(base.glob("*.safetensors"))) != len(list(ft.glob("*.safetensors")))
    kw = {"density": 0.4} if method == "ties" else {}
    result = _merge(base, ft, tmp_path / "out", method=method, weight=0.6, shard_size="150KB",
                    **kw)
    assert len(result.files) > 1 and result.merged_tensors == result.tensors
    b, f, out = load_state(base), load_state(ft), load_state(tmp_path / "out")
    assert set(out) == set(f)
    for name, t in out.items():
        assert t.dtype == torch.bfloat16
        expected = _reference(method, b[name], f[name], 0.6, kw.get("density"))
        if method == "ties":  # magnitude ties at the cut may resolve either way
            close = torch.isclose(t.float(), expected, **BF16_TOL)
            assert close.float().mean() > 0.995, name
        else:
            torch.testing.assert_close(t.float(), expected, **BF16_TOL)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_and_rescaled(method, pair, tmp_path):
    base, ft = pair
    b, f = load_state(base), load_state(ft)
    _merge(base, ft, tmp_path / "a", method=method, weight=0.5, density=0.3, seed=7)
    _merge(base, ft, tmp_path / "b", method=method, weight=0.5, density=0.3, seed=7)
    _merge(base, ft, tmp_path / "c", method=method, weight=0.5, density=0.3, seed=8)
    a, again, other = (load_state(tmp_path / x) for x in "abc")
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[n], again[n]) for n in a)
    assert not torch.equal(a[name], other[name])
    dropped = a[name] == b[name]
    assert abs(1 - dropped.float().mean().item() - 0.3) < 0.02
    rescaled = b[name] + 0.5 * (f[name] - b[name]) / 0.3
    torch.testing.assert_close(a[name][~dropped], rescaled[~dropped])


def test_output_is_a_loadable_hf_model(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "merged"
    _merge(base, ft, out, weight=0.5, shard_size="120KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (ft / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    b, f = LlamaForCausalLM.from_pretrained(base), LlamaForCausalLM.from_pretrained(ft)
    expected = torch.lerp(b.model.layers[1].mlp.down_proj.weight,
                          f.model.layers[1].mlp.down_proj.weight, 0.5)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, expected)


def test_no_remote_code_hook_is_copied(pair, tmp_path):
    base, ft = pair
    hooked = tmp_path / "hooked"
    shutil.copytree(ft, hooked)
    path = hooked / "tokenizer_config.json"
    clean = json.loads(path.read_text())
    path.write_text(json.dumps({**clean, "auto_map": {"AutoTokenizer": "evil/repo--tok.Evil"},
                                "processor_class": "evil/repo--proc.Evil"}))
    out = tmp_path / "merged"
    _merge(base, hooked, out, weight=0.5)
    assert json.loads((out / "tokenizer_config.json").read_text()) == clean
    assert AutoTokenizer.from_pretrained(out) is not None  # no trust_remote_code needed


def test_weight_endpoints_give_the_inputs(pair, tmp_path):
    base, ft = pair
    _merge(base, ft, tmp_path / "zero", weight=0.0)
    _merge(base, ft, tmp_path / "one", weight=1.0)
    b, f = load_state(base), load_state(ft)
    assert all(torch.equal(t, b[n]) for n, t in load_state(tmp_path / "zero").items())
    assert all(torch.equal(t, f[n]) for n, t in load_state(tmp_path / "one").items())


def test_dtype_option_converts_and_updates_config(bf16_pair, tmp_path):
    base, ft = bf16_pair
    _merge(base, ft, tmp_path / "out", dtype="float32")
    assert {t.dtype for t in load_state(tmp_path / "out").values()} == {torch.float32}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def _write(directory: Path, tensors: dict, config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return directory


def test_non_float_tensors_come_from_the_finetune(tmp_path):
    base = _write(tmp_path / "b", {"w": torch.zeros(4), "ids": torch.tensor([1, 2, 3])})
    ft = _write(tmp_path / "f", {"w": torch.ones(4), "ids": torch.tensor([4, 5, 6])})
    result = _merge(base, ft, tmp_path / "out", weight=0.25)
    out = load_state(tmp_path / "out")
    assert torch.equal(out["ids"], torch.tensor([4, 5, 6]))
    assert torch.equal(out["w"], torch.full((4,), 0.25))
    assert result.merged_tensors == 1


def _grown_finetune(base: Path, out: Path, new_tokens=("w_new1", "w_new2", "w_new3")) -> Path:
    model = LlamaForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(list(new_tokens))
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_grown_vocabulary_merges_shared_rows_and_keeps_new_ones(pair, tmp_path):
    base, _ = pair
    ft = _grown_finetune(base, tmp_path / "grown")
    result = _merge(base, ft, tmp_path / "out", weight=0.5)
    assert sorted(result.vocab_grown) == ["lm_head.weight", "model.embed_tokens.weight"]
    b, f, out = load_state(base), load_state(ft), load_state(tmp_path / "out")
    for name in result.vocab_grown:
        n = b[name].shape[0]
        assert out[name].shape[0] == n + 3
        torch.testing.assert_close(out[name][:n], torch.lerp(b[name], f[name][:n], 0.5))
        assert torch.equal(out[name][n:], f[name][n:])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 259
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 259


def test_grown_vocabulary_with_reordered_tokens_is_refused(pair, tmp_path):
    base, _ = pair
    ft = _grown_finetune(base, tmp_path / "grown")
    data = json.loads((ft / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["w10"], vocab["w11"] = vocab["w11"], vocab["w10"]
    (ft / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelsError, match="tokenizers disagree at token id 10"):
        _merge(base, ft, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_tied_embeddings(tmp_path):
    torch.manual_seed(3)
    tok = word_tokenizer(256)
    tied = LlamaForCausalLM(tiny_config(tie=True))
    base = save_model(tied, tok, tmp_path / "base")
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ft = save_model(tied, tok, tmp_path / "ft")
    assert "lm_head.weight" not in load_state(base)
    _merge(base, ft, tmp_path / "out", weight=0.5)
    out = load_state(tmp_path / "out")
    assert "lm_head.weight" not in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # a fine-tune saved untied, from a tied base: its lm_head merges with the base's embeddings
    untied = LlamaForCausalLM(tiny_config(tie=False))
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(tied.model.embed_tokens.weight + 0.05)
    ft2 = save_model(untied, tok, tmp_path / "ft-untied")
    _merge(base, ft2, tmp_path / "out2", weight=0.5)
    b, f, out = load_state(base), load_state(ft2), load_state(tmp_path / "out2")
    torch.testing.assert_close(out["lm_head.weight"],
                               torch.lerp(b["model.embed_tokens.weight"], f["lm_head.weight"], 0.5))


def _lora_adapter(base: Path, out: Path, modules_to_save=None, embed=True) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    model = LlamaForCausalLM.from_pretrained(base)
    targets = ["q_proj", "v_proj", "down_proj"] + (["embed_tokens"] if embed else [])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        modules_to_save=modules_to_save, alpha_pattern={"down_proj": 16})
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The full fine-tune as PEFT itself merges it (merge_and_unload)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_lora_adapter_merge_matches_peft(pair, tmp_path):
    base, _ = pair
    adapter = _lora_adapter(base, tmp_path / "adapter")
    result = _merge(base, adapter, tmp_path / "out", weight=0.6)
    assert result.adapter and 0 < result.merged_tensors < result.tensors
    peft_full, b = _peft_merged(base, adapter), load_state(base)
    out = load_state(tmp_path / "out")
    assert set(out) == set(peft_full)
    for name, t in out.items():
        expected = torch.lerp(b[name], peft_full[name], 0.6)
        torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "out" / "config.json").exists()  # from the base: the adapter has none
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_lora_as_adapter_gives_the_same_model_smaller(pair, tmp_path):
    from peft import PeftModel

    base, _ = pair
    adapter = _lora_adapter(base, tmp_path / "adapter", modules_to_save=["lm_head"])
    _merge(base, adapter, tmp_path / "full", weight=0.3)
    result = _merge(base, adapter, tmp_path / "small", weight=0.3, as_adapter=True)
    full = load_state(tmp_path / "full")
    assert result.bytes < sum(t.numel() * t.element_size() for t in full.values())
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "small")
    merged = model.merge_and_unload().state_dict()
    for name, t in full.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_refusals(pair, tmp_path):
    base, ft = pair
    with pytest.raises(UsageError, match="--as-adapter needs a LoRA adapter"):
        _merge(base, ft, tmp_path / "o", as_adapter=True)
    adapter = _lora_adapter(base, tmp_path / "adapter", embed=False)
    with pytest.raises(UsageError, match="linear"):
        _merge(base, adapter, tmp_path / "o", method="slerp", as_adapter=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(IncompatibleModelsError, match="DoRA"):
        _merge(base, adapter, tmp_path / "o")
    _no_leftovers(tmp_path / "o")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_different_architecture(pair, tmp_path):
    base, ft = pair
    ft2 = _copy(ft, tmp_path / "ft")
    cfg = json.loads((ft2 / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (ft2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleModelsError, match="architecture differs"):
        _merge(base, ft2, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_refuses_missing_extra_and_misshapen_tensors(tmp_path):
    cfg = {"model_type": "toy", "vocab_size": 10}
    base = _write(tmp_path / "b", {"a": torch.zeros(4, 3), "b": torch.zeros(2)}, cfg)
    cases = {
        "missing": ({"a": torch.zeros(4, 3)}, "tensor b is in the base but not in the fine-tune"),
        "extra": ({"a": torch.zeros(4, 3), "b": torch.zeros(2), "c": torch.zeros(1)},
                  "tensor c is in the fine-tune but not in the base"),
        "shape": ({"a": torch.zeros(4, 5), "b": torch.zeros(2)},
                  r"tensor a has shape \[4, 3\] in the base and \[4, 5\] in the fine-tune"),
    }
    for case, (tensors, message) in cases.items():
        ft = _write(tmp_path / case, tensors, cfg)
        with pytest.raises(IncompatibleModelsError, match=message):
            _merge(base, ft, tmp_path / "out")
        _no_leftovers(tmp_path / "out")


def test_refuses_pickle_only_finetune_unless_allowed(pair, tmp_path):
    base, _ = pair
    ft = tmp_path / "ft"
    ft.mkdir()
    shutil.copy(base / "config.json", ft)
    state = {k: v + 1 for k, v in load_state(base).items()}
    torch.save(state, ft / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        _merge(base, ft, tmp_path / "out")
    _no_leftovers(tmp_path / "out")
    _merge(base, ft, tmp_path / "out", weight=0.5, allow_pickle=True)
    b = load_state(base)
    assert all(torch.allclose(t, b[n] + 0.5) for n, t in load_state(tmp_path / "out").items())


def test_refuses_truncated_shard(pair, tmp_path):
    base, ft = pair
    ft2 = _copy(ft, tmp_path / "ft")
    shard = sorted(ft2.glob("*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        _merge(base, ft2, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_nan_in_output_writes_nothing(pair, tmp_path):
    base, _ = pair
    state = load_state(base)
    last = sorted(state)[-1]
    state[last] = state[last].clone()
    state[last][0] = math.inf
    ft = _write(tmp_path / "ft", state, json.loads((base / "config.json").read_text()))
    with pytest.raises(MergeError, match=f"NaN or Inf in tensor {last}.*the fine-tune"):
        _merge(base, ft, tmp_path / "out", shard_size="50KB")
    _no_leftovers(tmp_path / "out")


def test_interrupt_leaves_nothing_behind(pair, tmp_path):
    base, ft = pair
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_models(MergeRequest(str(base), str(ft), tmp_path / "out", shard_size="50KB"),
                     progress=interrupt)
    _no_leftovers(tmp_path / "out")


def test_existing_output_needs_overwrite(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _merge(base, ft, out)
    assert (out / "keep.txt").exists()
    _merge(base, ft, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("kw,message", [
    ({"weight": 1.5}, "--weight must be in"),
    ({"method": "magic"}, "unknown method"),
    ({"density": 0.5}, "--density applies to"),
    ({"method": "ties", "density": 0.0}, "--density must be in"),
    ({"dtype": "int8"}, "--dtype must be one of"),
    ({"shard_size": "lots"}, "--shard-size"),
])
def test_bad_arguments_are_refused_before_any_work(pair, tmp_path, kw, message):
    base, ft = pair
    with pytest.raises(UsageError, match=message):
        _merge(base, ft, tmp_path / "out", **kw)
    _no_leftovers(tmp_path / "out")


def test_model_refs():
    assert parse_model_ref("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_model_ref("org/name") == ("org/name", None)
    for bad in ("name", "org/name@", "../x/y", "a/b/c"):
        with pytest.raises(UsageError):
            parse_model_ref(bad)


@pytest.mark.parametrize("weight", [0.2, 0.5, 0.6, 0.9])
def test_linear_on_bf16_is_bit_identical_to_float32_maths(weight, bf16_pair, tmp_path):
    """The bf16 fast path (no upcast) must equal upcast-lerp-round exactly."""
    base, ft = bf16_pair
    _merge(base, ft, tmp_path / "out", weight=weight)
    b, f = load_state(base), load_state(ft)
    for name, t in load_state(tmp_path / "out").items():
        expected = torch.lerp(b[name].float(), f[name].float(), weight).to(torch.bfloat16)
        assert torch.equal(t, expected), name


def test_device_option(pair, tmp_path):
    base, ft = pair
    with pytest.raises(UsageError, match="--device must be"):
        _merge(base, ft, tmp_path / "x", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            _merge(base, ft, tmp_path / "x", device="cuda")
        return
    _merge(base, ft, tmp_path / "cpu", method="slerp", weight=0.4)
    _merge(base, ft, tmp_path / "gpu", method="slerp", weight=0.4, device="cuda")
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "gpu")
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name], t, rtol=1e-5, atol=1e-6)


def test_missing_config_is_refused(tmp_path):
    base = _write(tmp_path / "b", {"w": torch.zeros(2)})
    ft = _write(tmp_path / "f", {"w": torch.ones(2)})
    (ft / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        _merge(base, ft, tmp_path / "out")
