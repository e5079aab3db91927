"""Sharded safetensors in and out, one tensor (or a range of its rows) at a time.

Reading parses and validates each file's header, then reads tensor bytes with plain file reads
(no mmap), so memory holds only the tensors being merged. Writing knows every output tensor's
name, dtype and shape up front, so each shard's header is written first and the data streams in
behind it; no shard is ever held in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bot.errors import CheckpointError, InputNotFoundError, PickleRefusedError
from bot.merge.compat import PICKLE_PATTERNS

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
WRITE_QUEUE_BYTES = 64 * 1024 * 1024  # bytes waiting for the disk, at most (one tensor if larger)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; also KB/MB/GiB/MiB/bytes, as Hub tools write shard sizes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 5GB, 500MB or a number of bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; data is not read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        header_len = int.from_bytes(raw, "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: corrupt or truncated (header claims {header_len} bytes, "
                f"file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    data_start = 8 + header_len
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        info = TensorInfo(name, DTYPES[dtype_name], shape, path, data_start + begin)
        if end - begin != info.nbytes or begin < 0 or min(shape, default=0) < 0:
            raise CheckpointError(
                f"{path}: corrupt header: tensor {name!r} of shape {list(shape)} and dtype "
                f"{dtype_name} needs {info.nbytes} bytes, the header gives {end - begin}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                f"the file has {size} bytes"
            )
        tensors[name] = info
    return tensors


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Read a tensor, or rows [start, stop) of its first dimension.

    With `out` (a uint8 scratch tensor at least that large) the bytes land there and the result
    is a view of it, valid until the scratch is reused; otherwise a fresh tensor is returned.
    """
    shape = info.shape
    offset, nbytes = info.offset, info.nbytes
    if rows is not None and shape:
        start, stop = rows
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
        shape = (stop - start, *shape[1:])
    if nbytes == 0:
        return torch.empty(shape, dtype=info.dtype)
    buf = out[:nbytes] if out is not None and out.numel() >= nbytes else \
        torch.empty(nbytes, dtype=torch.uint8)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        got = os.preadv(fd, [buf.numpy()], offset)
    finally:
        os.close(fd)
    if got != nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return buf.view(info.dtype).reshape(shape)


class Checkpoint:
    """A model's weights in a directory: one safetensors file, or shards with an index.

    With `allow_pickle`, a pickle-only checkpoint is loaded with `weights_only=True` (no code
    runs), one file at a time; otherwise it is refused.
    """

    def __init__(self, directory: Path, allow_pickle: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise InputNotFoundError(f"{self.directory}: no such model directory")
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors = self._index(allow_pickle)

    def _index(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        index = self.directory / SAFETENSORS_INDEX
        if index.exists():
            return self._from_index(index)
        files = sorted(self.directory.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("adapter_model")]
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                for name, info in read_header(file).items():
                    if name in tensors:
                        raise CheckpointError(f"{self.directory}: tensor {name!r} is in two files")
                    tensors[name] = info
            return tensors
        pickles = sorted(p for pat in PICKLE_PATTERNS for p in self.directory.glob(pat)
                         if not p.name.startswith(("training_args", "optimizer", "scheduler")))
        if pickles and not allow_pickle:
            raise PickleRefusedError(
                f"{self.directory}: only pickle weights ({', '.join(p.name for p in pickles)}); "
                "pickle files can run code when loaded, so they are refused. Ask the owner for "
                "safetensors, or pass --allow-pickle to load them with weights_only=True."
            )
        if pickles:
            return self._from_pickles(pickles)
        raise CheckpointError(f"{self.directory}: no *.safetensors weights found")

    def _from_index(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: broken index (no weight_map object)") from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        tensors = {}
        for name, file_name in weight_map.items():
            file = self.directory / str(file_name)
            if file.parent != self.directory:
                raise CheckpointError(f"{index}: broken index: {file_name!r} is outside the model")
            if file_name not in headers:
                if not file.exists():
                    raise CheckpointError(f"{index}: broken index: {file_name} does not exist")
                headers[file_name] = read_header(file)
            if name not in headers[file_name]:
                raise CheckpointError(f"{index}: broken index: {name!r} is not in {file_name}")
            tensors[name] = headers[file_name][name]
        return tensors

    def _from_pickles(self, files: list[Path]) -> dict[str, TensorInfo]:
        tensors = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
                raise CheckpointError(f"{file}: cannot be loaded safely ({e})") from None
            self._pickled[file] = state
            for name, t in state.items():
                tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), file, -1)
        return tensors

    def read(self, name: str, rows: tuple[int, int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor (or a row range) as a CPU tensor in its stored dtype; see read_tensor."""
        info = self.tensors[name]
        if info.offset >= 0:
            return read_tensor(info, rows, out)
        t = self._pickled[info.file][name]
        return (t if rows is None else t[rows[0]:rows[1]]).clone()

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor declared before any data is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _FileWriter:
    """Writes byte buffers to files in order on one background thread.

    Disk writes then overlap the merge maths (both release the GIL). At most `budget` bytes wait
    in the queue, so memory stays bounded; an I/O error surfaces at the next call.
    """

    def __init__(self, budget: int = WRITE_QUEUE_BYTES):
        self._budget, self._queued = budget, 0
        self._jobs: deque[tuple[Path | None, memoryview | bytes | None]] = deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._file = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def submit(self, path: Path | None, data: memoryview | bytes | None) -> None:
        """Open `path` (if given), then write `data` (if given); None, None ends the thread."""
        size = len(data) if data is not None else 0
        with self._cond:
            self._cond.wait_for(lambda: self._error or not self._queued
                                or self._queued + size <= self._budget)
            if self._error:
                raise self._error
            self._jobs.append((path, data))
            self._queued += size
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs)
                path, data = self._jobs[0]
            try:
                if self._error is None:
                    if path is not None:
                        if self._file:
                            self._file.close()
                        self._file = open(path, "wb")  # noqa: SIM115 - closed on the next path
                    if data is not None:
                        self._file.write(data)
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self._error = e
            with self._cond:
                self._jobs.popleft()
                self._queued -= len(data) if data is not None else 0
                self._cond.notify_all()
            if path is None and data is None:
                if self._file:
                    self._file.close()
                return

    def finish(self) -> None:
        """Flush everything, close the file, and raise any error the thread met."""
        if self._thread.is_alive():
            with self._cond:
                self._jobs.append((None, None))
                self._cond.notify_all()
            self._thread.join()
        if self._error:
            raise self._error


class ShardedWriter:
    """Streams tensors into safetensors shards of at most `max_shard_bytes`, in declared order.

    One shard is named model.safetensors (no index), as transformers does; several are named
    model-0000i-of-0000N.safetensors with a model.safetensors.index.json. Call `append` for each
    tensor in order (several calls per tensor for row chunks), then `close` (or `abort`).
    """

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.directory = Path(directory)
        self.specs = specs
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        names = ([SAFETENSORS_SINGLE] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.shards = list(zip(names, shards, strict=True))
        self._order: Iterator[tuple[str, TensorSpec]] = (
            (file, spec) for file, group in self.shards for spec in group)
        self._io = _FileWriter()
        self._file_name: str | None = None
        self._current: TensorSpec | None = None
        self._remaining = 0

    def append(self, name: str, data: torch.Tensor) -> None:
        """Write the next bytes of tensor `name` (the whole tensor or its next rows).

        The tensor must not be modified afterwards: it is written from a background thread.
        """
        if self._remaining == 0:
            self._next(name)
        if name != self._current.name or data.dtype != self._current.dtype:
            raise RuntimeError(f"writer expected {self._current.name}, got {name} {data.dtype}")
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if raw.numel() > self._remaining:
            raise RuntimeError(f"too many bytes for tensor {name}")
        self._io.submit(None, raw.numpy().data)
        self._remaining -= raw.numel()

    def _next(self, name: str) -> None:
        try:
            file_name, spec = next(self._order)
        except StopIteration:
            raise RuntimeError(f"writer got unexpected tensor {name}") from None
        if file_name != self._file_name:
            self._open(file_name)
        self._current, self._remaining = spec, spec.nbytes

    def _open(self, file_name: str) -> None:
        group = next(g for f, g in self.shards if f == file_name)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in group:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._io.submit(self.directory / file_name, len(raw).to_bytes(8, "little") + raw)
        self._file_name = file_name

    def close(self) -> list[str]:
        """Finish the last shard, check every tensor was written, write the index if sharded."""
        if self._remaining:
            raise RuntimeError(f"tensor {self._current.name} is incomplete")
        for _ in self._order:
            raise RuntimeError("writer closed before all tensors were written")
        self._io.finish()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs)},
                     "weight_map": {s.name: f for f, group in self.shards for s in group}}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [f for f, _ in self.shards]

    def abort(self) -> None:
        """Stop writing (after an error); what was written is left for the caller to remove."""
        with contextlib.suppress(BaseException):  # the caller's error matters, not this one
            self._io.finish()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
