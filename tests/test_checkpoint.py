"""Reading and writing safetensors shards: agreement with the safetensors library, and refusals."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bot.errors import CheckpointError, PickleRefusedError
from bot.merge.checkpoint import Checkpoint, ShardedWriter, TensorSpec, parse_size, read_header

from conftest import load_state


def _save(directory, tensors, name="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / name)
    return directory / name


def test_reads_every_tensor_like_the_reference(pair):
    _, ft = pair  # five shards with an index
    ckpt = Checkpoint(ft)
    ref = load_state(ft)
    assert set(ckpt.tensors) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_reads_row_ranges(tmp_path):
    t = torch.arange(60, dtype=torch.bfloat16).reshape(10, 6)
    _save(tmp_path, {"w": t, "s": torch.tensor(3.0)})
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.read("w", (3, 7)), t[3:7])
    assert torch.equal(ckpt.read("s"), torch.tensor(3.0))


def test_writer_streams_shards_with_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(40, 30, generator=g).to(torch.bfloat16)
               for i in range(6)}
    tensors["step"] = torch.tensor([7], dtype=torch.int64)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_bytes=5000)
    for name, t in tensors.items():
        if t.ndim == 2:  # in two row chunks, as the engine writes elementwise merges
            writer.append(name, t[:15])
            writer.append(name, t[15:])
        else:
            writer.append(name, t)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])


def test_writer_refuses_out_of_order_and_incomplete(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    writer = ShardedWriter(tmp_path, specs, 1 << 20)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.append("b", torch.zeros(4))
    writer = ShardedWriter(tmp_path, specs, 1 << 20)
    writer.append("a", torch.zeros(4))
    with pytest.raises(RuntimeError, match="before all tensors"):
        writer.close()


def test_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path, {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="truncated: tensor 'w' ends at byte"):
        Checkpoint(tmp_path)


def test_corrupt_header_is_refused(tmp_path):
    path = _save(tmp_path, {"w": torch.randn(10)})
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_header(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(path)


def test_header_with_wrong_byte_count_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                 + b"\0" * 16)
    with pytest.raises(CheckpointError, match="needs 16 bytes, the header gives 8"):
        Checkpoint(tmp_path)


def test_broken_index_is_refused(pair, tmp_path):
    _save(tmp_path, {"a": torch.zeros(2)}, "part1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "part1.safetensors",
                                                "b": "part2.safetensors"}}))
    with pytest.raises(CheckpointError, match="part2.safetensors does not exist"):
        Checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "part1.safetensors",
                                                "b": "part1.safetensors"}}))
    with pytest.raises(CheckpointError, match="'b' is not in part1.safetensors"):
        Checkpoint(tmp_path)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="broken index"):
        Checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the model"):
        Checkpoint(tmp_path)


def test_pickle_only_is_refused_unless_allowed(tmp_path):
    tensors = {"w": torch.randn(3, 3)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pass --allow-pickle"):
        Checkpoint(tmp_path)
    ckpt = Checkpoint(tmp_path, allow_pickle=True)
    assert torch.equal(ckpt.read("w"), tensors["w"])


class PrintOnLoad:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    # unpickling this would call a function (collections.OrderedDict is fine; print is not)
    torch.save({"w": torch.zeros(2), "x": PrintOnLoad()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        Checkpoint(tmp_path, allow_pickle=True)


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("100KB") == 100_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five gigs")
