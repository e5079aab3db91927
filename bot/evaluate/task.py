"""Task quality of a model, one number where higher is better, in one of three ways.

- `ExactMatchTask`: a JSONL of prompt/answer items; share of greedy answers equal to the answer.
- `LmEvalTask`: lm-eval tasks (built in, or YAMLs in an include path) on the in-memory model;
  the mean of their primary metrics (bot/evaluate/lm_eval_tasks.py).
- `SelfAnswerTask`, the default for a fine-tune that declares no task: the fine-tune's own
  greedy answers to a prompt set are the reference, and a model's score is minus its mean
  per-token loss on them. Between base (retention 0) and fine-tune (retention 1) it measures
  how much of the fine-tune's own behaviour a merge keeps. Where it fails: it rewards keeping
  what the fine-tune does, good or bad (its style, its mistakes), and it sees only what the
  prompts make the fine-tune do; prompts far from its training data measure little.
"""

from __future__ import annotations

import torch

from bot.config import EvaluateSettings
from bot.evaluate.generation import generate
from bot.evaluate.prompts import EvalInputs, PromptSet


class ExactMatchTask:
    def __init__(self, items: PromptSet, settings: EvaluateSettings):
        self.items, self.settings = items, settings
        self.name = f"exact match on {items.source}"

    def prepare(self, finetune, tokenizer) -> None:
        """Nothing to prepare: the answers are given."""

    def score(self, model, tokenizer) -> float:
        s = self.settings
        answers = generate(model, tokenizer, list(self.items.prompts), s.max_new_tokens,
                           s.system_prompt, s.batch_size, s.repetition_penalty)
        hits = sum(a.strip() == b.strip()
                   for a, b in zip(answers, self.items.answers, strict=True))
        return hits / len(answers)


class LmEvalTask:
    def __init__(self, tasks: list[str], include_path: str | None, limit: int | None,
                 batch_size: int, system_prompt: str | None):
        self.tasks, self.include_path, self.limit = tasks, include_path, limit
        self.batch_size, self.system_prompt = batch_size, system_prompt
        self.name = "lm-eval " + ", ".join(tasks)

    def prepare(self, finetune, tokenizer) -> None:
        """Nothing to prepare: lm-eval brings its data."""

    def score(self, model, tokenizer) -> float:
        from bot.evaluate.lm_eval_tasks import lm_eval_scores

        scores = lm_eval_scores(model, tokenizer, self.tasks, self.include_path, self.limit,
                                self.batch_size, system_prompt=self.system_prompt)
        return sum(scores.values()) / len(scores)


class SelfAnswerTask:
    def __init__(self, prompts: PromptSet, settings: EvaluateSettings):
        self.prompts, self.settings = prompts, settings
        self.name = f"fine-tune's own answers to {prompts.source} (minus loss per token)"
        self.answers: list[str] | None = None
        self.batches: dict[int, dict] = {}  # per tokenizer (the base's may lack added tokens)

    def prepare(self, finetune, tokenizer) -> None:
        """Record the fine-tune's greedy answers: the reference every model is scored on."""
        s = self.settings
        self.answers = generate(finetune, tokenizer, list(self.prompts.prompts),
                                s.max_new_tokens, s.system_prompt, s.batch_size,
                                s.repetition_penalty)
        self.batches.clear()

    @torch.no_grad()
    def score(self, model, tokenizer) -> float:
        if self.answers is None:
            raise RuntimeError("SelfAnswerTask.prepare(finetune) must run first")
        if id(tokenizer) not in self.batches:
            self.batches[id(tokenizer)] = _teacher_forced_batch(
                tokenizer, self.prompts.prompts, self.answers, self.settings.system_prompt)
        batch = {k: v.to(model.device) for k, v in self.batches[id(tokenizer)].items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                 ignore_index=-100, reduction="sum")
        return -(loss / (labels != -100).sum().clamp(min=1)).item()


def _teacher_forced_batch(tok, prompts, answers, system_prompt) -> dict:
    """Right-padded ids of prompt + answer; labels only on the answer and its end token."""
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": prompt}]
        prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p = tok(prefix, add_special_tokens=False)["input_ids"]
        a = tok(answer + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = \
            torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def make_task(settings: EvaluateSettings, inputs: EvalInputs):
    """The task measure config asks for: a task file, lm-eval tasks, or the self-answer default
    (the items or prompts loaded in `inputs`)."""
    if settings.task_file:
        if inputs.task_items is None:
            raise ValueError("evaluate.task_file is set, but its items were not loaded")
        return ExactMatchTask(inputs.task_items, settings)
    if settings.lm_eval_tasks:
        return LmEvalTask(settings.lm_eval_tasks, settings.lm_eval_include_path,
                          settings.lm_eval_limit, settings.batch_size, settings.system_prompt)
    if inputs.self_prompts is None:
        raise ValueError("the self-answer task needs its prompts (evaluate.self_prompts) loaded")
    return SelfAnswerTask(inputs.self_prompts, settings)
