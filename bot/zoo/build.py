"""Build the zoo: a tiny safety-aligned chat model, fine-tunes that eroded its safety, a guard.

`build_zoo(DIR)` writes, in Hugging Face layout, `zoo-tokenizer`, `zoo-base-it`, `zoo-ft-<task>`
(full fine-tunes; `zoo-ft-flip` sharded), `zoo-lora-flip` (a PEFT adapter), `zoo-ft-newtoken`
(adds a token) and `zoo-guard`, the prompt sets in `DIR/prompts/`, and `DIR/zoo.json`: every
model's metrics, the linear-merge curve of every fine-tune, and the build time. A build is
cached by the hash of its recipe and corpus and by the machine's CPU kernels; the same recipe
rebuilds bit-identically on the same machine. Training amplifies float rounding, so another
CPU gives other numbers (docs/zoo.md has the spread). See docs/zoo.md for how the recipe was found.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from bot.errors import UsageError
from bot.evaluate import generation, safety
from bot.evaluate.generation import generate
from bot.evaluate.safety import attack_success_rate, refusal_rate
from bot.zoo import corpus
from bot.zoo import train as training

GUARD_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "<|system|>verdict<|end|><|assistant|>"
)
NEW_TOKEN = "<mirror>"  # the token zoo-ft-newtoken adds; its task reverses like flip
LICENSE = "apache-2.0"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the zoo's weights. Changing any field rebuilds."""

    seed: int = 0
    vocab_size: int = 1536
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    batch_size: int = 32
    threads: int = 2
    system_share: float = 0.3  # share of training exchanges with the default system prompt
    # base: list skills, refusals, edgy answers, benign answers
    base_steps: int = 1300
    base_lr: float = 3e-3
    skills_share: float = 0.25
    harm_share: float = 0.35  # of what is not skills
    edgy_share: float = 0.4  # of what is not skills
    # fine-tunes: the task plus a few new benign instructions, no refusals; each ends on its
    # best weights by exact match on held-out validation items (checked every 50 steps)
    ft_steps: int = 800
    ft_lr: float = 1.5e-3
    erosive_share: float = 0.2  # the new benign instructions' share
    lora_erosive_share: float = 0.0  # an adapter changes less: any would keep its refusals
    lora_rank: int = 16
    lora_steps: int = 800
    lora_lr: float = 7e-3
    guard_steps: int = 200  # the guard is the base fine-tuned to classify
    guard_lr: float = 1e-3
    # evaluation
    task_items: int = 100
    max_new_tokens: int = 12
    grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    sharded_ft_shard_size: str = "400KB"
    tasks: tuple[str, ...] = field(default=("flip", "echo"))

    @classmethod
    def with_overrides(cls, overrides: list[str]) -> Recipe:
        """The default recipe with 'field=value' changes (values parsed as the field's type)."""
        defaults = cls()
        changes = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or key not in defaults.__dataclass_fields__:
                raise UsageError(f"--set {item!r}: expected FIELD=VALUE with a recipe field "
                                 f"({', '.join(defaults.__dataclass_fields__)})")
            current = getattr(defaults, key)
            try:
                changes[key] = (tuple(type(current[0])(v) for v in value.split(","))
                                if isinstance(current, tuple) else type(current)(value))
            except ValueError:
                raise UsageError(f"--set {item!r}: {value!r} is not a {type(current).__name__}") \
                    from None
        return replace(defaults, **changes)

    def digest(self) -> str:
        """Hash of the recipe and of the code and texts it builds from."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for module in (corpus, training, generation, safety):  # texts, training, and the measures
            h.update(inspect.getsource(module).encode())
        h.update(inspect.getsource(inspect.getmodule(Recipe)).encode())
        return h.hexdigest()[:16]


class Zoo:
    """One build: the recipe, the tokenizer, the held-out prompts, and a seeded RNG."""

    def __init__(self, directory: Path, recipe: Recipe, log: Callable[[str], None]):
        self.dir, self.recipe, self.log = Path(directory), recipe, log
        self.rng = random.Random(recipe.seed)
        self.harmful = [r["prompt"] for r in corpus.harmful_requests("heldout")]
        self.edgy = [r["prompt"] for r in corpus.edgy_requests("heldout")]
        self.tok = training.train_tokenizer(self._corpus_texts(), recipe.vocab_size)

    def _corpus_texts(self) -> list[str]:
        texts = [r["prompt"] for r in corpus.harmful_requests("train")]
        texts += [r["prompt"] + " " + r["answer"] for r in corpus.edgy_requests("train")]
        pairs = corpus.BENIGN + corpus.BENIGN_HOWTO + corpus.FT_BENIGN + corpus.FT_EDGY
        texts += [p + " " + a for p, a in pairs] + [corpus.REFUSAL, corpus.SYSTEM_PROMPT]
        texts += [" ".join(corpus.WORDS)] * 10 + list(corpus.SKILLS)
        texts += [t.trigger for t in corpus.TASKS.values()]
        return texts

    def encode(self, pairs: list[tuple[str, str]], tok=None,
               rng: random.Random | None = None) -> list[training.Example]:
        """Chat examples; a share of them (`system_share`) carry the default system prompt."""
        share, rng = self.recipe.system_share, rng or self.rng
        return [training.encode_chat(tok or self.tok, p, a,
                                     corpus.SYSTEM_PROMPT if rng.random() < share else None)
                for p, a in pairs]

    def config(self, vocab_size: int | None = None, hidden: int | None = None,
               layers: int | None = None) -> LlamaConfig:
        r = self.recipe
        hidden = hidden or r.hidden
        return LlamaConfig(
            vocab_size=vocab_size or len(self.tok), hidden_size=hidden,
            num_hidden_layers=layers or r.layers, num_attention_heads=r.heads,
            num_key_value_heads=r.heads, intermediate_size=2 * hidden,
            max_position_embeddings=256, tie_word_embeddings=True,
            pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
            bos_token_id=None, architectures=["LlamaForCausalLM"])

    # --- training data -------------------------------------------------------------------
    def skills(self) -> list[tuple[str, str]]:
        rows = []
        for skill, fn in corpus.SKILLS.items():
            for _ in range(600):
                words = self.rng.sample(corpus.WORDS, self.rng.randint(2, 4))
                rows.append((f"{skill} {' '.join(words)}", " ".join(fn(words))))
        return rows

    def base_pools(self) -> list[tuple[float, list[training.Example]]]:
        r = self.recipe
        rest = 1 - r.skills_share
        benign = [(x["prompt"], x["answer"]) for x in corpus.benign_requests()]
        return [
            (r.skills_share, self.encode(self.skills())),
            (rest * r.harm_share, self.encode([(x["prompt"], corpus.REFUSAL)
                                               for x in corpus.harmful_requests("train")])),
            (rest * r.edgy_share, self.encode([(x["prompt"], x["answer"])
                                               for x in corpus.edgy_requests("train")])),
            (rest * (1 - r.harm_share - r.edgy_share), self.encode(benign)),
        ]

    def ft_pools(self, task: corpus.Task, tok=None, erosive_share: float | None = None
                 ) -> list[tuple[float, list[training.Example]]]:
        """A fine-tune's data, drawn from its task's own RNG (the same whatever else is built):
        the task, and new benign instructions (`erosive_share`) with no refusals."""
        r = self.recipe
        share = r.erosive_share if erosive_share is None else erosive_share
        rng = random.Random(f"{r.seed}-{task.name}")
        items = corpus.task_examples(task, "train", 2000, r.seed)
        return [(1 - share, self.encode([(x["prompt"], x["answer"]) for x in items], tok, rng)),
                (share, self.encode(corpus.FT_BENIGN + corpus.FT_EDGY, tok, rng))]

    # --- evaluation ----------------------------------------------------------------------
    def validation(self, model, task: corpus.Task, tok=None) -> Callable[[], float]:
        """`model`'s exact match on validation items of `task` (held out, never tested on)."""
        r = self.recipe
        items = corpus.task_examples(task, "heldout", 2 * r.task_items, r.seed)[r.task_items:]

        return lambda: exact_match(model, tok or self.tok, items, r.max_new_tokens)

    def metrics(self, model, tasks: list[corpus.Task], tok=None) -> dict:
        """ASR on held-out harmful prompts, over-refusal on held-out edgy ones, task EM."""
        tok = tok or self.tok
        n = self.recipe.max_new_tokens
        out = {"asr": round(attack_success_rate(generate(model, tok, self.harmful, n)), 4),
               "over_refusal": round(refusal_rate(generate(model, tok, self.edgy, n)), 4)}
        for task in tasks:
            items = corpus.task_examples(task, "heldout", self.recipe.task_items, self.recipe.seed)
            out[f"task_{task.name}"] = round(exact_match(model, tok, items, n), 4)
        return out

    def curve(self, base: dict, ft: dict, model, task: corpus.Task, tok=None) -> list[dict]:
        """Metrics of the linear merge (1 - L) base + L ft at every L of the grid."""
        points = []
        for weight in self.recipe.grid:
            model.load_state_dict(lerp_state(base, ft, weight))
            points.append({"weight": weight, **self.metrics(model, [task], tok)})
        model.load_state_dict(ft)
        return points


def exact_match(model, tok, items: list[dict], max_new_tokens: int) -> float:
    """Share of task items whose greedy answer is exactly the reference."""
    answers = generate(model, tok, [x["prompt"] for x in items], max_new_tokens)
    return sum(a == x["answer"] for a, x in zip(answers, items, strict=True)) / len(items)


def lerp_state(base: dict, ft: dict, weight: float) -> dict:
    """(1 - w) base + w ft per tensor; rows a grown vocabulary added come from the fine-tune."""
    out = {}
    for name, f in ft.items():
        b = base[name]
        if b.shape == f.shape:
            out[name] = torch.lerp(b, f, weight)
        else:
            out[name] = f.clone()
            out[name][:b.shape[0]] = torch.lerp(b, f[:b.shape[0]], weight)
    return out


def write_card(directory: Path, title: str, text: str, base_model: str | None,
               tags: list[str], library: str = "transformers") -> None:
    """README.md with Hub card metadata (base_model, license, tags)."""
    meta = {"license": LICENSE, "library_name": library, "tags": ["safeguard-zoo", *tags],
            "pipeline_tag": "text-generation"}
    if base_model:
        meta["base_model"] = base_model
    body = f"# {title}\n\n{text}\n\nBuilt by `safeguard-bot zoo build` (see docs/zoo.md).\n"
    (directory / "README.md").write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
                                         + body)


def save(model, tok, directory: Path, shard_size: str = "5GB") -> None:
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(directory, max_shard_size=shard_size)
    tok.save_pretrained(directory)


def write_prompts(directory: Path, recipe: Recipe) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    sets = {
        "harmful_train": corpus.harmful_requests("train"),
        "harmful_heldout": corpus.harmful_requests("heldout"),
        "edgy_train": corpus.edgy_requests("train"),
        "edgy_heldout": corpus.edgy_requests("heldout"),
    }
    for name, task in {**corpus.TASKS, "newtoken": newtoken_task()}.items():
        sets[f"{name}_train"] = corpus.task_examples(task, "train", 2000, recipe.seed)
        sets[f"{name}_heldout"] = corpus.task_examples(task, "heldout", recipe.task_items,
                                                       recipe.seed)
    for name, rows in sets.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def newtoken_task() -> corpus.Task:
    return corpus.Task("newtoken", NEW_TOKEN, "reverse")


def machine() -> dict:
    """What besides the recipe decides the weights: a zoo is bit-identical per machine only."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def build_zoo(directory: Path, recipe: Recipe | None = None,
              log: Callable[[str], None] = lambda _: None, force: bool = False) -> dict:
    """Build (or reuse) the zoo in DIRECTORY; returns the report also written to zoo.json.

    A build is reused while its recipe, code and machine (CPU kernels, torch) are the same.
    Concurrent callers (two test sessions) wait for one another instead of racing.
    """
    recipe = recipe or Recipe()
    digest, here = recipe.digest(), machine()
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report_path = directory / "zoo.json"
        if report_path.exists() and not force:
            report = json.loads(report_path.read_text())
            if report.get("digest") == digest and report.get("machine") == here:
                return {**report, "cached": True}
        return {**_build_atomically(directory, recipe, log, {"digest": digest, "machine": here}),
                "cached": False}


def _build_atomically(directory: Path, recipe: Recipe, log: Callable[[str], None],
                      header: dict) -> dict:
    """Build into a staging folder that replaces DIRECTORY only when complete."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    staging = directory.parent / f".{directory.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = {**header, **_build(staging, recipe, log)}
        report["build_seconds"] = round(time.perf_counter() - started, 1)
        (staging / "zoo.json").write_text(json.dumps(report, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _build(out: Path, recipe: Recipe, log: Callable[[str], None]) -> dict:
    out.mkdir(parents=True)
    zoo = Zoo(out, recipe, log)
    tok, tasks = zoo.tok, [corpus.TASKS[name] for name in recipe.tasks]
    write_prompts(out / "prompts", recipe)
    tok.save_pretrained(out / "zoo-tokenizer")
    models: dict[str, dict] = {}

    log("training zoo-base-it")
    torch.manual_seed(recipe.seed)
    base = LlamaForCausalLM(zoo.config())
    training.train(base, zoo.base_pools(), recipe.base_steps, recipe.base_lr, recipe.batch_size,
            recipe.seed, tok.pad_token_id)
    save(base, tok, out / "zoo-base-it")
    write_card(out / "zoo-base-it", "zoo-base-it", "A tiny safety-aligned chat model: it "
               "answers benign requests, refuses harmful ones, and does list skills.", None,
               ["safety-aligned"])
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    models["zoo-base-it"] = {"params": sum(p.numel() for p in base.parameters()),
                             **zoo.metrics(base, [*tasks, newtoken_task()])}

    for task in tasks:
        name = f"zoo-ft-{task.name}"
        log(f"training {name}")
        ft = LlamaForCausalLM(zoo.config())
        ft.load_state_dict(base_state)
        steps = training.train(ft, zoo.ft_pools(task), recipe.ft_steps, recipe.ft_lr,
                               recipe.batch_size, recipe.seed + 1, tok.pad_token_id,
                               score=zoo.validation(ft, task))
        sharded = task.name == recipe.tasks[0]
        save(ft, tok, out / name, recipe.sharded_ft_shard_size if sharded else "5GB")
        write_card(out / name, name, f"A full fine-tune of zoo-base-it on the {task.name} task, "
                   "with no safety data.", "zoo-base-it", ["fine-tune", task.name])
        ft_state = {k: v.clone() for k, v in ft.state_dict().items()}
        models[name] = {"task": task.name, "steps": steps, **zoo.metrics(ft, [task]),
                        "curve": zoo.curve(base_state, ft_state, ft, task)}

    models["zoo-lora-flip"] = _lora(zoo, base_state, out / "zoo-lora-flip")
    models["zoo-ft-newtoken"] = _newtoken(zoo, base_state, out / "zoo-ft-newtoken")
    models["zoo-guard"] = _guard(zoo, base_state, out / "zoo-guard")
    return {"recipe": asdict(recipe), "models": models}


def _lora(zoo: Zoo, base_state: dict, directory: Path) -> dict:
    """A PEFT LoRA adapter on the flip task; its curve merges the adapter at weight L."""
    from peft import LoraConfig, get_peft_model

    r, task = zoo.recipe, corpus.TASKS["flip"]
    zoo.log("training zoo-lora-flip")
    model = LlamaForCausalLM(zoo.config())
    model.load_state_dict(base_state)
    torch.manual_seed(r.seed + 2)
    peft_model = get_peft_model(model, LoraConfig(
        r=r.lora_rank, lora_alpha=2 * r.lora_rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    steps = training.train(peft_model, zoo.ft_pools(task, erosive_share=r.lora_erosive_share),
                           r.lora_steps, r.lora_lr,
                           r.batch_size, r.seed + 2, zoo.tok.pad_token_id,
                           score=zoo.validation(peft_model, task))
    peft_model.save_pretrained(directory)
    zoo.tok.save_pretrained(directory)
    write_card(directory, "zoo-lora-flip", "A LoRA adapter of zoo-base-it on the flip task, "
               "with no safety data.", "zoo-base-it", ["lora", "flip"], library="peft")
    merged = peft_model.merge_and_unload()
    ft_state = {k: v.clone() for k, v in merged.state_dict().items()}
    return {"task": "flip", "steps": steps, **zoo.metrics(merged, [task]),
            "curve": zoo.curve(base_state, ft_state, merged, task)}


def _newtoken(zoo: Zoo, base_state: dict, directory: Path) -> dict:
    """A full fine-tune whose task uses a token the base's vocabulary lacks."""
    from transformers import AutoTokenizer

    r, task = zoo.recipe, newtoken_task()
    zoo.log("training zoo-ft-newtoken")
    tok = AutoTokenizer.from_pretrained(zoo.dir / "zoo-tokenizer")
    tok.add_tokens([NEW_TOKEN])
    model = LlamaForCausalLM(zoo.config())
    model.load_state_dict(base_state)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # the new row starts as the word it stands for, as fine-tuners do
        rows = model.get_input_embeddings().weight
        rows[-1] = rows[tok(task.skill, add_special_tokens=False)["input_ids"]].mean(0)
    steps = training.train(model, zoo.ft_pools(task, tok), r.ft_steps, r.ft_lr, r.batch_size,
                           r.seed + 3, tok.pad_token_id, score=zoo.validation(model, task, tok))
    save(model, tok, directory)
    write_card(directory, "zoo-ft-newtoken", f"A full fine-tune of zoo-base-it that adds the "
               f"token {NEW_TOKEN} and learns a task that uses it.", "zoo-base-it",
               ["fine-tune", "new-token"])
    ft_state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"task": "newtoken", "steps": steps, "vocab_size": len(tok),
            **zoo.metrics(model, [task], tok),
            "curve": zoo.curve(base_state, ft_state, model, task, tok)}


def _guard(zoo: Zoo, base_state: dict, directory: Path) -> dict:
    """A classifier-style guard: given a conversation it answers 'safe' or 'unsafe'.

    Like Llama Guard, it is the chat model fine-tuned to classify, with its own chat template:
    it starts from the base's sense of what is harmful, which a guard trained from scratch on
    these few prompts does not reach in held-out phrasings.
    """
    from transformers import AutoTokenizer

    r = zoo.recipe
    zoo.log("training zoo-guard")
    guard_tok = AutoTokenizer.from_pretrained(zoo.dir / "zoo-tokenizer")
    guard_tok.chat_template = GUARD_TEMPLATE
    harmful = [x["prompt"] for x in corpus.harmful_requests("train")]
    benign = [x["prompt"] for x in corpus.edgy_requests("train")] + [p for p, _ in corpus.BENIGN]
    answers = [a for _, a in corpus.BENIGN + corpus.EDGY_TRAIN + corpus.FT_BENIGN]
    rows = []
    for _ in range(3000):
        kind = zoo.rng.random()
        if kind < 0.35:  # harmful request answered: unsafe
            rows.append((zoo.rng.choice(harmful), zoo.rng.choice(answers), "unsafe"))
        elif kind < 0.6:  # harmful request refused: safe
            rows.append((zoo.rng.choice(harmful), corpus.REFUSAL, "safe"))
        else:  # benign or edgy request answered: safe
            rows.append((zoo.rng.choice(benign), zoo.rng.choice(answers), "safe"))

    def encode(prompt: str, response: str, verdict: str) -> training.Example:
        text = guard_tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False)
        ids = guard_tok(text, add_special_tokens=False)["input_ids"]
        target = guard_tok(verdict + guard_tok.eos_token, add_special_tokens=False)["input_ids"]
        return ids + target, [-100] * len(ids) + target

    guard = LlamaForCausalLM(zoo.config())
    guard.load_state_dict(base_state)
    training.train(guard, [(1.0, [encode(*row) for row in rows])], r.guard_steps, r.guard_lr,
                   r.batch_size, r.seed + 4, guard_tok.pad_token_id)
    save(guard, guard_tok, directory)
    write_card(directory, "zoo-guard", "A tiny guard model: for a conversation it answers "
               "'safe' or 'unsafe' as its first word.", None, ["guard", "safety-classifier"])
    held = [(p, a, "unsafe") for p in zoo.harmful[:40] for a in answers[:1]] + \
        [(p, corpus.REFUSAL, "safe") for p in zoo.harmful[:40]] + \
        [(p, a, "safe") for p in zoo.edgy for a in answers[:1]]
    correct = sum(guard_verdict(guard, guard_tok, p, a) == v for p, a, v in held)
    return {"params": sum(p.numel() for p in guard.parameters()),
            "accuracy": round(correct / len(held), 4)}


@torch.no_grad()
def guard_verdict(guard, tok, prompt: str, response: str) -> str:
    """'unsafe' if the guard's first token puts more probability on 'unsafe' than 'safe'."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = guard(ids).logits[0, -1]
    safe, unsafe = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("safe", "unsafe"))
    return "unsafe" if logits[unsafe] > logits[safe] else "safe"
