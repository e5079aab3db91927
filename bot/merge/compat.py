"""What a merge can take, decided from configs and file names alone (no tensors, no torch).

Discovery (bot/discovery.py) asks before anything is downloaded; the engine asks again before it
merges. Both get the same answer from here.
"""

from __future__ import annotations

# Weight files in Python's pickle format: loading one can run code, so the bot refuses them
# unless asked (and then loads them with weights_only=True); discovery skips pickle-only repos.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_PATTERNS = tuple(f"*{suffix}" for suffix in PICKLE_SUFFIXES)

# the only files copied beside the merged weights: config, generation, tokenizer, chat template
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
             "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
             "chat_template.jinja", "chat_template.json", "qwen.tiktoken", "tokenizer.tiktoken")
# license files, carried from the fine-tune, else from the base
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt", "NOTICE.md",
                 "USE_POLICY.md")

# config keys that must agree: the architecture, then the shapes every tensor depends on
ARCHITECTURE_KEYS = ("model_type", "architectures")
SHAPE_KEYS = ("hidden_size", "num_hidden_layers")


def architecture_mismatch(config: dict, base_config: dict | None) -> str | None:
    """Why a fine-tune's config.json cannot be merged with its base's, or None if it can.

    A key missing from either config is not held against it (the tensors are checked later).
    """
    if base_config is None:
        return None
    for key in ARCHITECTURE_KEYS:
        if key in config and key in base_config and config[key] != base_config[key]:
            return f"architecture differs from the base ({key} {config[key]} vs " \
                   f"{base_config[key]})"
    for key in SHAPE_KEYS:
        if key in config and key in base_config and config[key] != base_config[key]:
            return f"shape differs from the base ({key} {config[key]} vs {base_config[key]})"
    return None
