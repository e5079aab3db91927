"""Training pieces for the zoo: a byte-level BPE chat tokenizer and a small supervised loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

Example = tuple[list[int], list[int]]  # input ids, labels (-100 where no loss)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE on `texts`: every string is encodable, frequent words are one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                   eos_token="<|end|>", bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_chat(tok, prompt: str, answer: str, system: str | None = None) -> Example:
    """Token ids of one exchange; the loss covers the answer and its end token only."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    prefix = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prefix_ids + answer_ids, [-100] * len(prefix_ids) + answer_ids


def _pad(examples: list[Example], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool as two right-padded tensors (ids, labels), built once."""
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
    return ids, labels


def _batch(padded, lengths, weights, batch_size: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch drawn from the weighted pools, cut to its longest sequence."""
    which = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
    rows_ids, rows_labels, width = [], [], 1
    for p, (ids, labels) in enumerate(padded):
        n = int((which == p).sum())
        if n:
            pick = torch.randint(len(ids), (n,), generator=gen)
            rows_ids.append(ids[pick])
            rows_labels.append(labels[pick])
            width = max(width, int(lengths[p][pick].max()))
    return (torch.cat([r[:, :width] for r in rows_ids]),
            torch.cat([r[:, :width] for r in rows_labels]))


def train(model, pools: list[tuple[float, list[Example]]], steps: int, lr: float,
          batch_size: int, seed: int, pad_id: int, warmup: int = 30,
          score: Callable[[], float] | None = None, check_every: int = 50) -> int:
    """AdamW on batches drawn from weighted pools; warm-up, then cosine decay to a tenth.

    With `score` (a validation measure, asked every `check_every` steps in eval mode), training
    ends on the latest of the best-scoring weights seen, so a late collapse is never kept.
    Returns the step whose weights the model ends with.

    Sequences are right-padded and padding carries no loss, so no attention mask is needed:
    under a causal mask a padding token can only influence later padding.
    """
    gen = torch.Generator().manual_seed(seed)
    width = max(len(ids) for _, examples in pools for ids, _ in examples)
    padded = [_pad(examples, pad_id, width) for _, examples in pools]
    lengths = [(ids != pad_id).sum(1) for ids, _ in padded]
    weights = torch.tensor([w for w, _ in pools], dtype=torch.float)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    best = (-1.0, 0, None)  # score, step, weights
    model.train()
    for step in range(1, steps + 1):
        ids, labels = _batch(padded, lengths, weights, batch_size, gen)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if score and (step % check_every == 0 or step == steps):
            model.eval()
            measured = score()
            if measured >= best[0]:
                best = (measured, step, {k: v.clone() for k, v in model.state_dict().items()})
            model.train()
    model.eval()
    if score and best[1] != steps:
        model.load_state_dict(best[2])
        return best[1]
    return steps
