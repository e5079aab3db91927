"""What the Hub derives from a repo's files: card metadata, tags, library, pipeline, weights.

The Hub reads the YAML front matter of README.md and the files of a commit and computes the
tags that `list_models(filter=...)` matches. The rules kept here are the ones the bot relies on
(base_model relations above all); see docs/localhub.md for the list.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import yaml

FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", re.S | re.M)
OPENING = re.compile(r"\A\ufeff?---[ \t]*\r?\n")
MAX_FRONT_MATTER = 64 * 1024  # characters of YAML metadata a card may carry
CARD_HEAD = 4 * MAX_FRONT_MATTER + 1024  # the bytes of README.md read for its metadata
MAX_DEPTH = 64
RELATIONS = ("adapter", "merge", "quantized", "finetune")
# Files larger than this go through LFS whatever their name or content (the Hub's rule).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# The .gitattributes the Hub writes into every new repo (its LFS patterns, abridged).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5",
        "*.joblib", "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx",
        "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar",
        "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    ))
SMALL_JSON = 5 * 1024 * 1024
# what a commit derives when its files cannot be read: no card data, no tags
NOTHING = {"cardData": None, "tags": [], "library_name": None, "pipeline_tag": None,
           "base_model_relation": None, "safetensors": None}
ReadBlob = Callable[[str], bytes]


class CardError(ValueError):
    """README.md metadata that is not a YAML mapping, or one past the limits."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases (no "billion laughs") and with bounded nesting."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise CardError("YAML aliases (*name) are not allowed in README.md metadata")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise CardError(f"README.md metadata is nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _plain(value: Any) -> Any:
    """YAML values as JSON would carry them (dates become strings)."""
    return json.loads(json.dumps(value, default=str))


def parse_front_matter(text: str) -> dict | None:
    """The YAML metadata block at the top of a model card, or None when there is none.

    At most MAX_FRONT_MATTER characters, no aliases, nested at most MAX_DEPTH deep; `text`
    may be the card's first CARD_HEAD bytes only.
    """
    match = FRONT_MATTER.match(text)
    if match is None:
        if OPENING.match(text) and len(text) >= MAX_FRONT_MATTER:  # no end within the limit
            raise CardError(f"README.md metadata is longer than {MAX_FRONT_MATTER} characters")
        return None
    if len(match.group(1)) > MAX_FRONT_MATTER:
        raise CardError(f"README.md metadata is longer than {MAX_FRONT_MATTER} characters")
    try:
        data = yaml.load(match.group(1), Loader=_Loader)  # noqa: S506 - a safe loader
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise CardError("README.md metadata must be a YAML mapping (key: value lines)")
        return _plain(data)
    except CardError:
        raise
    except yaml.YAMLError as e:
        raise CardError(f"invalid YAML metadata in README.md: {e}") from e
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # dates, date keys...
        raise CardError(f"invalid YAML metadata in README.md: {type(e).__name__}: {e}") from e


def lfs_patterns(gitattributes: str) -> list[str]:
    """The path patterns a .gitattributes file sends through LFS."""
    patterns = []
    for line in gitattributes.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def matches_lfs(path: str, patterns: list[str]) -> bool:
    """Whether a path matches a .gitattributes LFS pattern (name-only patterns match any dir)."""
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(path, pattern.replace("**/", "*").lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def upload_mode(path: str, size: int, sample: bytes, patterns: list[str]) -> str:
    """'lfs' or 'regular', as the Hub's preupload answers: by pattern, size or binary content."""
    if size >= LFS_SIZE_THRESHOLD or matches_lfs(path, patterns) or b"\x00" in sample:
        return "lfs"
    return "regular"


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def _json_file(tree: Mapping[str, dict], path: str, read: ReadBlob) -> dict | None:
    entry = tree.get(path)
    if entry is None or entry["size"] > SMALL_JSON:
        return None
    try:
        data = json.loads(read(entry["sha256"]))
    except (ValueError, UnicodeDecodeError, RecursionError):  # a hostile file: no config
        return None
    return data if isinstance(data, dict) else None


def _tensor_counts(header: Any) -> dict[str, int] | None:
    """Parameters per dtype in one safetensors header; None when it is not a valid one."""
    if not isinstance(header, dict):
        return None
    counts: dict[str, int] = {}
    for name, tensor in header.items():
        if name == "__metadata__" or not isinstance(tensor, dict):
            continue
        shape, dtype = tensor.get("shape", []), tensor.get("dtype", "?")
        if not isinstance(shape, list) or not isinstance(dtype, str) or \
                not all(type(dim) is int and dim >= 0 for dim in shape):
            return None
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return counts


def safetensors_info(tree: Mapping[str, dict],
                     read_head: Callable[[str, int], bytes]) -> dict | None:
    """Parameter counts per dtype over every *.safetensors file, read from their headers
    (a file whose header is not valid counts for nothing)."""
    counts: dict[str, int] = {}
    found = False
    for path, entry in tree.items():
        if not path.endswith(".safetensors") or entry["size"] < 8:
            continue
        head = read_head(entry["sha256"], 8)
        if len(head) < 8:
            continue
        (length,) = struct.unpack("<Q", head)
        if length > min(entry["size"] - 8, 100 * 1024 * 1024):
            continue
        try:
            header = json.loads(read_head(entry["sha256"], 8 + length)[8:])
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        file_counts = _tensor_counts(header)
        if file_counts is None:
            continue
        found = True
        for dtype, n in file_counts.items():
            counts[dtype] = counts.get(dtype, 0) + n
    if not found:
        return None
    return {"parameters": counts, "total": sum(counts.values())}


def base_model_tags(card: dict, paths: list[str]) -> tuple[list[str], str | None]:
    """`base_model:X` and `base_model:<relation>:X` tags, and the relation.

    The relation is `base_model_relation` when the card gives a valid one; otherwise adapter
    (adapter_config.json), merge (several bases), quantized (GGUF files) or finetune.
    """
    bases = _as_list(card.get("base_model"))
    if not bases:
        return [], None
    relation = card.get("base_model_relation")
    if relation not in RELATIONS:
        if "adapter_config.json" in paths:
            relation = "adapter"
        elif len(bases) > 1:
            relation = "merge"
        elif any(p.endswith(".gguf") for p in paths):
            relation = "quantized"
        else:
            relation = "finetune"
    tags = [f"base_model:{b}" for b in bases] + [f"base_model:{relation}:{b}" for b in bases]
    return tags, relation


def derive(repo_type: str, tree: Mapping[str, dict], card: dict, read: ReadBlob,
           read_head: Callable[[str, int], bytes]) -> dict:
    """Card data, tags, library, pipeline tag, config and safetensors info of one commit.

    `tree` maps paths to entries with `sha256` and `size`; `card` is README.md's metadata
    ({} for none or broken); `read` returns a blob's bytes.
    """
    paths = sorted(tree)
    tags: list[str] = []
    out: dict[str, Any] = {"cardData": card or None}
    if repo_type == "model":
        config = _json_file(tree, "config.json", read)
        library = card.get("library_name") if isinstance(card.get("library_name"), str) else None
        if library is None:
            if "adapter_config.json" in paths:
                library = "peft"
            elif config is not None:
                library = "transformers"
            elif any(p.endswith(".gguf") for p in paths):
                library = "gguf"
        pipeline = card.get("pipeline_tag") if isinstance(card.get("pipeline_tag"), str) else None
        architectures = _as_list((config or {}).get("architectures"))
        if pipeline is None and library == "transformers":
            if any(a.endswith("ForCausalLM") for a in architectures):
                pipeline = "text-generation"
            elif any(a.endswith("ForSequenceClassification") for a in architectures):
                pipeline = "text-classification"
        model_type = (config or {}).get("model_type")
        tags += [library] if library else []
        tags += ["safetensors"] if any(p.endswith(".safetensors") for p in paths) else []
        tags += ["gguf"] if any(p.endswith(".gguf") for p in paths) else []
        tags += [model_type] if isinstance(model_type, str) and model_type else []
        tags += [pipeline] if pipeline else []
        tags += _as_list(card.get("tags"))
        tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
        tags += _as_list(card.get("language"))
        base_tags, relation = base_model_tags(card, paths)
        tags += base_tags
        out.update(library_name=library, pipeline_tag=pipeline, base_model_relation=relation)
        if config is not None:
            out["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        out["safetensors"] = safetensors_info(tree, read_head)
    else:
        tags += _as_list(card.get("tags"))
        tags += [f"task_categories:{t}" for t in _as_list(card.get("task_categories"))]
        tags += [f"size_categories:{t}" for t in _as_list(card.get("size_categories"))]
        tags += [f"language:{t}" for t in _as_list(card.get("language"))]
    tags += [f"license:{lic}" for lic in _as_list(card.get("license"))]
    out["tags"] = list(dict.fromkeys(tags))
    return out
