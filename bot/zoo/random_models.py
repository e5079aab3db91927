"""Random Llama-style checkpoints in HF layout: merge-engine fixtures, benchmarks and the demo.

These are not trained (the trained zoo lives beside them); they give real transformers models
with real tokenizer files, in any size, dtype and sharding, and a "fine-tune" that is the base
plus a small random task vector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def tiny_config(vocab: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4,
                intermediate: int = 128, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=intermediate, max_position_embeddings=256,
                       tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=1)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with `vocab` tokens (w4, w5, ...) and a chat template."""
    words = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    words.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path,
               dtype: torch.dtype = torch.float32, shard_size: str = "5GB") -> Path:
    out = Path(out)
    model.to(dtype).save_pretrained(out, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    return out


def random_pair(directory: Path, config: LlamaConfig | None = None, seed: int = 0,
                task_scale: float = 0.01, dtype: torch.dtype = torch.float32,
                base_shards: str = "5GB", ft_shards: str = "5GB") -> tuple[Path, Path]:
    """A random base and a 'fine-tune' (base + task_scale * noise), saved under DIR/base, DIR/ft."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    tokenizer = word_tokenizer(config.vocab_size)
    base_dir = save_model(base, tokenizer, Path(directory) / "base", dtype, base_shards)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * task_scale)
    ft_dir = save_model(base, tokenizer, Path(directory) / "ft", dtype, ft_shards)
    return base_dir, ft_dir
