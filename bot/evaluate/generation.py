"""Batched greedy chat generation: prompts through the model's chat template, left-padded."""

from __future__ import annotations

import torch

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
             system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, batch_size: int = 64,
             repetition_penalty: float = 1.0) -> list[str]:
    """Greedy answers to single-turn `prompts`, decoded without special tokens."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return _generate(model, tokenizer, prompts, max_new_tokens, system_prompt, batch_size,
                         repetition_penalty)
    finally:
        tokenizer.padding_side = side


def _generate(model, tokenizer, prompts, max_new_tokens, system_prompt, batch_size,
              repetition_penalty) -> list[str]:
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(_messages(p, system_prompt), tokenize=False,
                                               add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             repetition_penalty=repetition_penalty,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _messages(prompt: str, system_prompt: str | None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": prompt}]
