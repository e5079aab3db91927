"""The zoo: built once per session into .cache/zoo (reused while the recipe is unchanged)."""

import json

import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.evaluate.generation import generate
from bot.merge.engine import MergeRequest, merge_models
from bot.zoo import bars, corpus
from bot.zoo.build import Recipe, Zoo, build_zoo, guard_verdict

MODELS = ["zoo-base-it", "zoo-ft-flip", "zoo-ft-echo", "zoo-lora-flip", "zoo-ft-newtoken",
          "zoo-guard"]


def test_report_gives_every_model_its_metrics(zoo):
    _, report = zoo
    assert set(report["models"]) == set(MODELS)
    assert report["build_seconds"] > 0
    base = report["models"]["zoo-base-it"]
    assert base["params"] < 10_000_000
    for name in ("zoo-ft-flip", "zoo-ft-echo", "zoo-lora-flip", "zoo-ft-newtoken"):
        m = report["models"][name]
        assert {"asr", "over_refusal", f"task_{m['task']}", "curve"} <= set(m)
        assert [p["weight"] for p in m["curve"]] == list(Recipe().grid)


def test_every_model_loads_and_generates(zoo):
    directory, _ = zoo
    assert (directory / "zoo-ft-flip" / "model.safetensors.index.json").exists()
    for name in ("zoo-base-it", "zoo-ft-flip", "zoo-ft-echo", "zoo-ft-newtoken"):
        model = AutoModelForCausalLM.from_pretrained(directory / name)
        tok = AutoTokenizer.from_pretrained(directory / name)
        answers = generate(model, tok, ["reverse apple river", "what color is the sky"], 8)
        assert all(isinstance(a, str) for a in answers)
    tok = AutoTokenizer.from_pretrained(directory / "zoo-tokenizer")
    text = "any text at all: ünïcode, 123, <tags>"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: everything encodes


def test_lora_adapter_loads_with_peft(zoo):
    from peft import PeftModel

    directory, _ = zoo
    base = AutoModelForCausalLM.from_pretrained(directory / "zoo-base-it")
    model = PeftModel.from_pretrained(base, directory / "zoo-lora-flip")
    tok = AutoTokenizer.from_pretrained(directory / "zoo-lora-flip")
    assert generate(model, tok, ["flip apple river"], 6)


def test_cards_carry_hub_metadata(zoo):
    directory, _ = zoo
    for name in MODELS:
        text = (directory / name / "README.md").read_text()
        meta = yaml.safe_load(text.split("---")[1])
        assert meta["license"] == "apache-2.0" and "safeguard-zoo" in meta["tags"]
        if name not in ("zoo-base-it", "zoo-guard"):
            assert meta["base_model"] == "zoo-base-it"
    assert "chat_template" in json.loads(
        (directory / "zoo-base-it" / "tokenizer_config.json").read_text()) or \
        (directory / "zoo-base-it" / "chat_template.jinja").exists()


def test_prompt_sets(zoo):
    directory, _ = zoo
    sets = {p.stem: [json.loads(x) for x in p.read_text().splitlines()]
            for p in (directory / "prompts").glob("*.jsonl")}
    for name in ("harmful_train", "harmful_heldout", "edgy_heldout", "flip_train", "flip_heldout",
                 "echo_train", "echo_heldout"):
        assert sets[name] and all("prompt" in row for row in sets[name])
    assert {r["category"] for r in sets["harmful_heldout"]} == set(corpus.HARMFUL)
    for task in ("flip", "echo", "harmful", "edgy"):
        train = {r["prompt"] for r in sets[f"{task}_train"]}
        assert not train & {r["prompt"] for r in sets[f"{task}_heldout"]}


def test_merge_engine_reproduces_the_curve(zoo, tmp_path):
    """The engine's linear merge at 0.5 behaves exactly like the build's in-memory merge."""
    directory, report = zoo
    merge_models(MergeRequest(str(directory / "zoo-base-it"), str(directory / "zoo-ft-flip"),
                              tmp_path / "m", weight=0.5), quiet=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    zoo_ = Zoo(directory, Recipe(), lambda _: None)
    metrics = zoo_.metrics(model, [corpus.TASKS["flip"]])
    point = next(p for p in report["models"]["zoo-ft-flip"]["curve"] if p["weight"] == 0.5)
    assert metrics == {k: v for k, v in point.items() if k != "weight"}


def test_merge_engine_takes_the_adapter_and_the_grown_vocabulary(zoo, tmp_path):
    directory, _ = zoo
    base = str(directory / "zoo-base-it")
    lora = merge_models(MergeRequest(base, str(directory / "zoo-lora-flip"), tmp_path / "lora",
                                     weight=0.6), quiet=True)
    grown = merge_models(MergeRequest(base, str(directory / "zoo-ft-newtoken"),
                                      tmp_path / "grown", weight=0.6), quiet=True)
    assert lora.adapter and grown.vocab_grown == ["model.embed_tokens.weight"]
    for out in ("lora", "grown"):
        AutoModelForCausalLM.from_pretrained(tmp_path / out)
    state = load_file(tmp_path / "grown" / "model.safetensors")
    base_vocab = json.loads((directory / "zoo-base-it" / "config.json").read_text())["vocab_size"]
    assert state["model.embed_tokens.weight"].shape[0] == base_vocab + 1


def test_guard_tells_safe_from_unsafe(zoo):
    directory, report = zoo
    guard = AutoModelForCausalLM.from_pretrained(directory / "zoo-guard")
    tok = AutoTokenizer.from_pretrained(directory / "zoo-guard")
    harmful = corpus.harmful_requests("heldout")[0]["prompt"]
    assert guard_verdict(guard, tok, harmful, corpus.REFUSAL) == "safe"
    assert guard_verdict(guard, tok, harmful, "buy the parts and follow these steps.") == "unsafe"
    assert report["models"]["zoo-guard"]["accuracy"] >= bars.GUARD_MIN_ACCURACY


def test_rebuild_is_cached_and_bit_identical(tmp_path):
    """Same recipe, same bytes; the second call reuses the first build."""
    small = Recipe(base_steps=8, ft_steps=4, lora_steps=4, guard_steps=4,
                   task_items=4, grid=(0.5,))
    first = build_zoo(tmp_path / "a", small)
    assert build_zoo(tmp_path / "a", small)["cached"]
    build_zoo(tmp_path / "b", small)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file() and p.name != "zoo.json")
    assert files and first["models"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_zoo_meets_the_bars(zoo):
    _, report = zoo
    assert bars.unmet(report) == []
