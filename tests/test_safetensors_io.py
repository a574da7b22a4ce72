"""The streaming safetensors reader and writer against the safetensors library itself."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CheckpointError
from pipeline.safetensors_io import SafetensorsIndex, SafetensorsWriter, read_header


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "transformer.layers.0.attention.qkv.weight": torch.randn(12, 5, generator=g).half(),
        "transformer.layers.0.attention.qkv.weights_scaling_factor": torch.rand(1, generator=g),
        "lm_head.weight": torch.randn(9, 5, generator=g),
        "b.bias": torch.randn(7, generator=g).bfloat16(),
        "fp8": (torch.randn(4, 6, generator=g) * 100).to(torch.float8_e4m3fn),
        "int8": torch.randint(-128, 127, (3, 8), generator=g, dtype=torch.int8),
        "ids": torch.arange(5, dtype=torch.int32),
    }


def test_writer_bytes_equal_save_file_whatever_the_block_order(tmp_path):
    tensors = _tensors(0)
    save_file(tensors, tmp_path / "ref.safetensors")
    writer = SafetensorsWriter(tmp_path / "ours.safetensors", {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    for name, t in reversed(list(tensors.items())):  # rows out of order, in uneven blocks
        rows = t.shape[0]
        for start in reversed(range(0, rows, 2)):
            writer.write_rows(name, t[start:start + 2], start)
    writer.close()
    ref = (tmp_path / "ref.safetensors").read_bytes()
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(ref).hexdigest()


def test_writer_refuses_to_close_with_a_hole(tmp_path):
    writer = SafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (4, 2))})
    writer.write_rows("a", torch.zeros(2, 2), 0)
    with pytest.raises(AssertionError, match="got 16 of 32 bytes"):
        writer.close()


def test_read_rows_returns_exact_slices(tmp_path):
    tensors = _tensors(1)
    save_file(tensors, tmp_path / "model.safetensors")
    index = SafetensorsIndex.from_folder(tmp_path)
    assert set(index.names) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(index.read(name), t)
        if t.shape[0] > 2:
            assert torch.equal(index.read_rows(name, 1, 3), t[1:3])


def test_sharded_folder_with_index(tmp_path):
    tensors = _tensors(2)
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:3]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[3:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    index = SafetensorsIndex.from_folder(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(index.read(name), t)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "truncated or corrupt"),
    (lambda b: b[:5], "no header"),
    (lambda b: struct.pack("<Q", 10**12) + b[8:], "header claims"),
    (lambda b: b[:8] + b"{not json" + b[17:], "corrupt safetensors header"),
])
def test_corrupt_files_are_named_errors(tmp_path, damage, message):
    save_file(_tensors(3), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_written_file_loads_with_safetensors(tmp_path):
    t = torch.randn(3, 4)
    writer = SafetensorsWriter(tmp_path / "a.safetensors", {"x": (t.dtype, tuple(t.shape))})
    writer.write_rows("x", t)
    writer.close()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["x"], t)
