"""Plan and run a merge of a base and a fine-tune, tensor by tensor, into a new HF model folder.

Planning checks that the two can be merged (architecture, tensor names, shapes, a grown
vocabulary, tied embeddings, adapters) and refuses with an error naming the tensor when they
cannot. Running streams every tensor from disk through the method and into the output shards,
inside a staging folder that becomes OUT only when everything is written: a crash or Ctrl-C
leaves no half-written model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from bot.errors import (
    CheckpointError,
    IncompatibleModelsError,
    InputNotFoundError,
    MergeError,
    OutputExistsError,
    UsageError,
)
from bot.merge.checkpoint import (
    Checkpoint,
    ShardedWriter,
    TensorSpec,
    fsync_dir,
    parse_size,
    read_tensor,
)
from bot.merge.compat import AUX_FILES, LICENSE_FILES, architecture_mismatch
from bot.merge.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterCheckpoint, is_adapter
from bot.merge.methods import METHODS, MergeParams, method_named, names_where

DEFAULT_SHARD_SIZE = "5GB"
DEFAULT_DENSITY = 0.5  # for ties / dare_*: keep half of the task vector
CHUNK_ELEMENTS = 1 << 20  # elementwise methods work on at most this many elements at a time
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
LM_HEAD = "lm_head.weight"
DTYPE_CHOICES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class MergeRequest:
    """What to merge, how, and where to write it (the `merge` command's arguments, with base
    and fine-tune as local directories)."""

    base: str | Path
    finetune: str | Path
    out: Path
    method: str = "linear"
    weight: float = 0.5
    density: float | None = None
    seed: int = 0
    dtype: str | None = None
    shard_size: str = DEFAULT_SHARD_SIZE
    device: str = "cpu"
    as_adapter: bool = False
    allow_pickle: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class MergeResult:
    """What was written, for the command's JSON output and for later stages."""

    out: str
    method: str
    weight: float
    density: float | None
    seed: int | None
    adapter: bool
    as_adapter: bool
    tensors: int
    merged_tensors: int
    vocab_grown: list[str]
    files: list[str]
    bytes: int
    seconds: float
    # keys removed from copied JSON files as remote code ({file: [keys]})
    stripped: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merged from (base_name, name), or copied from the fine-tune."""

    name: str
    base_name: str | None
    spec: TensorSpec
    shared_rows: int | None = None  # a grown vocabulary: only these first rows are merged


def validate(req: MergeRequest) -> tuple[float | None, torch.dtype | None, int]:
    """Check the request's values before any work; returns density, dtype, shard bytes."""
    method = method_named(req.method)
    if not 0.0 <= req.weight <= 1.0:
        raise UsageError(f"--weight must be in [0, 1] (lambda, the fine-tune's weight), "
                         f"got {req.weight}")
    density = req.density
    if density is not None and not method.uses_density:
        raise UsageError(f"--density applies to {names_where('uses_density')}, "
                         f"not {req.method}")
    if method.uses_density:
        density = DEFAULT_DENSITY if density is None else density
        if not 0.0 < density <= 1.0:
            raise UsageError(f"--density must be in (0, 1], got {density}")
    if req.dtype is not None and req.dtype not in DTYPE_CHOICES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {req.dtype}")
    try:
        shard_bytes = parse_size(req.shard_size)
    except ValueError as e:
        raise UsageError(f"--shard-size: {e}") from None
    if shard_bytes <= 0:
        raise UsageError("--shard-size must be positive")
    if req.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", req.device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {req.device}")
    if req.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    if req.as_adapter and not method.keeps_adapter_form:
        raise UsageError(f"--as-adapter works with {names_where('keeps_adapter_form')} only: "
                         "other methods do not keep the low-rank form")
    if req.out.exists() and not req.overwrite:
        raise OutputExistsError(f"{req.out} exists; choose another OUT or pass --overwrite")
    return density, DTYPE_CHOICES.get(req.dtype) if req.dtype else None, shard_bytes


def model_dir(path: str | Path) -> Path:
    """A model's local directory (bot/hub.py resolves Hub ids to snapshots before a merge)."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        return directory
    if directory.exists():
        raise UsageError(f"{path} is a file; give the model's directory")
    raise InputNotFoundError(f"{path}: no such model directory (a Hub id is downloaded by "
                             "bot.hub.resolve_model first)")


def read_config(directory: Path) -> dict:
    """A model's config.json: the output needs it to be a loadable model."""
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json, so the merge would not be loadable")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def check_configs(base_cfg: dict, ft_cfg: dict) -> None:
    """Refuse models of different architectures or shapes (as discovery would skip them)."""
    reason = architecture_mismatch(ft_cfg, base_cfg)
    if reason:
        raise IncompatibleModelsError(f"cannot merge: the fine-tune's {reason}")


def _vocab_ids(directory: Path) -> dict[int, str]:
    """id -> token from a tokenizer.json (model vocab and added tokens); empty if none."""
    path = directory / "tokenizer.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = ({i: tok for tok, i in vocab.items()} if isinstance(vocab, dict)
           else {i: entry[0] for i, entry in enumerate(vocab)})
    ids.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return ids


def check_vocab_prefix(base_dir: Path, ft_dir: Path, shared: int) -> None:
    """A grown vocabulary must keep the base's first `shared` tokens at the same ids."""
    base_ids, ft_ids = _vocab_ids(base_dir), _vocab_ids(ft_dir)
    for i in range(min(shared, len(base_ids))):
        if i in base_ids and i in ft_ids and base_ids[i] != ft_ids[i]:
            raise IncompatibleModelsError(
                f"the tokenizers disagree at token id {i} (base {base_ids[i]!r}, fine-tune "
                f"{ft_ids[i]!r}): the fine-tune's vocabulary is not the base's plus new tokens")


def plan_merge(base: Checkpoint, ft: Checkpoint | AdapterCheckpoint, base_cfg: dict,
               ft_cfg: dict, dtype: torch.dtype | None) -> list[TensorJob]:
    """Pair every fine-tune tensor with its base tensor, or refuse naming the first misfit."""
    check_configs(base_cfg, ft_cfg)
    base_names = set(base.tensors)
    embedding = next((n for n in base.tensors if n.endswith(EMBEDDING_SUFFIXES)), None)
    jobs = []
    for name, info in ft.tensors.items():
        base_name = name
        if name not in base_names and name == LM_HEAD and embedding:
            base_name = embedding  # the base ties its output layer to its embeddings
        if base_name not in base_names:
            raise IncompatibleModelsError(
                f"tensor {name} is in the fine-tune but not in the base")
        out_dtype = dtype if (dtype and info.is_float) else info.dtype
        spec = TensorSpec(name, out_dtype, info.shape)
        base_info = base.tensors[base_name]
        if not info.is_float:
            jobs.append(TensorJob(name, None, spec))
            continue
        if base_info.shape == info.shape:
            jobs.append(TensorJob(name, base_name, spec))
        elif (len(info.shape) == len(base_info.shape) and info.shape[1:] == base_info.shape[1:]
              and info.shape[0] > base_info.shape[0]
              and ft_cfg.get("vocab_size", 0) > base_cfg.get("vocab_size", 0)):
            jobs.append(TensorJob(name, base_name, spec, shared_rows=base_info.shape[0]))
        else:
            raise IncompatibleModelsError(
                f"tensor {name} has shape {list(base_info.shape)} in the base and "
                f"{list(info.shape)} in the fine-tune")
    used = {job.base_name for job in jobs} | set(ft.tensors)
    missing = sorted(base_names - used)
    if missing:
        raise IncompatibleModelsError(
            f"tensor {missing[0]} is in the base but not in the fine-tune"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return jobs


@contextmanager
def _leave_a_core_for_io() -> Iterator[None]:
    """Run torch's CPU maths on all cores but one, left to the read-ahead and writer threads.

    The merge is a pipeline (read, maths, write); on 2 cores, spinning maths threads would
    otherwise steal the I/O threads' core (measured: the 1 GB benchmark runs about 10% faster).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden folder beside OUT that becomes OUT only if the block completes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out} appeared while merging; nothing was replaced")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_aux_files(sources: list[Path], out: Path, dtype: torch.dtype | None,
                   licensors: list[Path] = ()) -> dict[str, list[str]]:
    """Copy the allow-listed config, tokenizer and chat-template files (AUX_FILES; the first
    source that has one wins) and the license files of the first of `licensors` that has any;
    nothing else. Returns what was removed from the copied JSON files as remote code
    ({file: [keys]})."""
    for source in reversed(sources):  # later sources are fallbacks: copy them first
        for name in AUX_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    licensed = next((s for s in licensors if any((s / n).is_file() for n in LICENSE_FILES)), None)
    for name in LICENSE_FILES if licensed else ():
        if (licensed / name).is_file():
            shutil.copyfile(licensed / name, out / name)
    stripped = {file.name: keys for file in sorted(out.glob("*.json"))
                if (keys := strip_remote_code(file))}
    config = out / "config.json"
    if dtype is not None and config.exists():
        data = json.loads(config.read_text())
        name = str(dtype).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        data.update({k: name for k in keys})
        config.write_text(json.dumps(data, indent=2) + "\n")
    return stripped


def strip_remote_code(path: Path) -> list[str]:
    """Remove what would make transformers run a repo's code from a copied JSON file: `auto_map`
    and any `*_class` naming a module of a repo ("org/name--module.Class", "module.Class").
    Returns the keys removed (the file is rewritten only then)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        return []
    if not isinstance(data, dict):
        return []
    removed = [k for k, v in data.items() if k == "auto_map" or (
        k.endswith("_class") and isinstance(v, str) and ("--" in v or "/" in v or "." in v))]
    if removed:
        path.write_text(json.dumps({k: v for k, v in data.items() if k not in removed},
                                   indent=2) + "\n", encoding="utf-8")
    return removed


def tensor_generator(seed: int, name: str, device: str) -> torch.Generator:
    """A generator per tensor, so a tensor's random mask does not depend on tensor order."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return g


def _is_merged(job: TensorJob, ft: Checkpoint | AdapterCheckpoint) -> bool:
    """Whether the job merges (else it copies the fine-tune's tensor as is)."""
    if isinstance(ft, AdapterCheckpoint) and not ft.changed(job.name):
        return False  # merging a tensor with itself gives it back, for every method
    return job.base_name is not None


@dataclass(frozen=True)
class Chunk:
    """A piece of one output tensor: rows to merge, or rows to copy from the fine-tune."""

    job: TensorJob
    rows: tuple[int, int] | None  # None: the whole tensor
    merge: bool


def plan_chunks(jobs: list[TensorJob], ft: Checkpoint | AdapterCheckpoint,
                elementwise: bool) -> list[Chunk]:
    """Every output tensor as chunks, in writing order; elementwise methods get row chunks."""
    chunks = []
    for job in jobs:
        if not _is_merged(job, ft):
            chunks.append(Chunk(job, None, merge=False))
            continue
        shape = job.spec.shape
        rows = shape[0] if shape else 0
        shared = job.shared_rows if job.shared_rows is not None else rows
        step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
        if elementwise and shared:
            chunks += [Chunk(job, (i, min(i + step, shared)), True) for i in range(0, shared, step)]
        else:
            chunks.append(Chunk(job, None if shared == rows else (0, shared), True))
        if shared != rows:  # a grown vocabulary: the fine-tune's new rows, as they are
            chunks.append(Chunk(job, (shared, rows), merge=False))
    return chunks


def _read_ahead(chunks: list[Chunk], base: Checkpoint, ft: Checkpoint | AdapterCheckpoint
                ) -> Iterator[tuple[Chunk, torch.Tensor | None, torch.Tensor]]:
    """Yield (chunk, base part, fine-tune part), reading chunk i+1 on a helper thread.

    Reads release the GIL, so disk reads overlap the maths. Two pairs of scratch buffers
    alternate: a chunk's parts stay valid until the chunk after the next is requested.
    """
    size = CHUNK_ELEMENTS * 8
    scratch = [(torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8))
               for _ in range(2)]

    def read(i: int):
        chunk = chunks[i]
        if not chunk.merge:
            return chunk, None, ft.read(chunk.job.name, chunk.rows)
        b_buf, f_buf = scratch[i % 2]
        return (chunk, base.read(chunk.job.base_name, chunk.rows, b_buf),
                ft.read(chunk.job.name, chunk.rows, f_buf))

    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(read, 0) if chunks else None
        for i in range(len(chunks)):
            item = pending.result()
            pending = pool.submit(read, i + 1) if i + 1 < len(chunks) else None
            yield item


def _merge_chunk(chunk: Chunk, b: torch.Tensor | None, f: torch.Tensor, req: MergeRequest,
                 params: MergeParams) -> torch.Tensor:
    """The output for one chunk, a fresh CPU tensor (methods never return their inputs)."""
    dtype = chunk.job.spec.dtype
    if not chunk.merge:
        return f.to(dtype)
    method = METHODS[req.method]
    if method.seeded:  # seeded methods are not elementwise: one chunk per tensor
        params = MergeParams(params.weight, params.density,
                             tensor_generator(req.seed, chunk.job.name, req.device))
    b, f = b.to(req.device), f.to(req.device)
    if not (method.float32_inside and b.dtype == f.dtype == dtype):
        b, f = b.float(), f.float()
    merged = method.fn(b, f, params).to(dtype)
    # one cheap reduction: a NaN or Inf anywhere makes the sum non-finite
    if not math.isfinite(merged.sum()) and not torch.isfinite(merged).all():
        where = ("the base" if not torch.isfinite(b).all() else
                 "the fine-tune" if not torch.isfinite(f).all() else "the merge")
        raise MergeError(f"NaN or Inf in tensor {chunk.job.name} (it comes from {where}); "
                         "nothing was written")
    return merged.cpu()


def _write_adapter(ft: AdapterCheckpoint, base: Checkpoint, weight: float, out: Path) -> int:
    """The linear merge as an adapter: lora_B scaled by the weight, full tensors interpolated.

    base + weight * (scaling * B @ A) is the adapter with B scaled; tensors the adapter replaces
    outright (modules_to_save, biases) become (1 - weight) * base + weight * adapter's.
    """
    data = {}
    for mod in ft.modules.values():
        data[mod.a.name] = read_tensor(mod.a)
        data[mod.b.name] = (read_tensor(mod.b).float() * weight).to(mod.b.dtype)
    for name, info in ft.replaced.items():
        merged = torch.lerp(base.read(name).float(), read_tensor(info).float(), weight)
        data[info.name] = merged.to(info.dtype)
    save_file(data, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    shutil.copyfile(ft.directory / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    return sum(t.numel() * t.element_size() for t in data.values())


def merge_models(req: MergeRequest, progress: Progress | None = None,
                 quiet: bool = False) -> MergeResult:
    """Merge BASE and FINETUNE (local directories) into OUT as the request says; see the module
    docstring. `progress(bytes done, bytes total)` follows the merge; `quiet` is for callers
    that share one signature with downloads (the merge itself prints nothing)."""
    started = time.perf_counter()
    density, dtype, shard_bytes = validate(req)
    base_dir, ft_dir = model_dir(req.base), model_dir(req.finetune)
    base = Checkpoint(base_dir, allow_pickle=req.allow_pickle)
    adapter = is_adapter(ft_dir)
    if req.as_adapter and not adapter:
        raise UsageError("--as-adapter needs a LoRA adapter as FINETUNE")
    ft = AdapterCheckpoint(base, ft_dir) if adapter else Checkpoint(ft_dir, req.allow_pickle)
    base_cfg = read_config(base_dir)
    ft_cfg = base_cfg if adapter else read_config(ft_dir)
    jobs = plan_merge(base, ft, base_cfg, ft_cfg, dtype)
    grown = [job.name for job in jobs if job.shared_rows is not None]
    if grown:
        check_vocab_prefix(base_dir, ft_dir, min(j.shared_rows for j in jobs if j.shared_rows))
    params = MergeParams(req.weight, density if density is not None else 1.0)
    total = sum(job.spec.nbytes for job in jobs)
    done = 0
    with staged_output(req.out, req.overwrite) as tmp, _leave_a_core_for_io():
        if req.as_adapter:
            total = _write_adapter(ft, base, req.weight, tmp)
            stripped = copy_aux_files([ft_dir], tmp, None)
            files = [ADAPTER_WEIGHTS]
        else:
            writer = ShardedWriter(tmp, [job.spec for job in jobs], shard_bytes)
            chunks = plan_chunks(jobs, ft, METHODS[req.method].elementwise)
            try:
                for chunk, b, f in _read_ahead(chunks, base, ft):
                    out = _merge_chunk(chunk, b, f, req, params)
                    writer.append(chunk.job.name, out)
                    done += out.numel() * out.element_size()
                    if progress:
                        progress(done, total)
                files = writer.close()
            finally:
                writer.abort()
            stripped = copy_aux_files([ft_dir, base_dir] if adapter else [ft_dir], tmp, dtype,
                                      licensors=[ft_dir, base_dir])
    return MergeResult(
        out=str(req.out), method=req.method, weight=req.weight, density=density,
        seed=req.seed if METHODS[req.method].seeded else None, adapter=adapter,
        as_adapter=req.as_adapter, tensors=len(jobs),
        merged_tensors=sum(_is_merged(job, ft) for job in jobs),
        vocab_grown=grown, files=files, bytes=total,
        seconds=round(time.perf_counter() - started, 3), stripped=stripped)

