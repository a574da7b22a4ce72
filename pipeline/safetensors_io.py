"""Streaming safetensors: read byte ranges of tensors and write files piece by piece.

`safetensors.safe_open` maps whole files, so every page a converter touches stays in its resident set; and
`safetensors.torch.save_file` needs every tensor of a file in memory at once. A converter that must hold one
tensor at a time, whatever the model's size, needs both sides in pieces:

- `SafetensorsIndex` reads only headers, validates them (a corrupt file is an error naming the file), and
  returns row ranges of a tensor with `pread`, so memory follows the slice, not the file.
- `SafetensorsWriter` computes the exact header `save_file` would write (same tensor order, same JSON, same
  padding), preallocates the file, and accepts row blocks of each tensor in any order from any thread.
  The bytes are identical to `save_file` of the same tensors (tests/test_safetensors_io.py checks this).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import CheckpointError

# safetensors dtype names and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# save_file orders tensors by dtype (descending, in the order of the library's Dtype enum), then by name.
# These ranks follow that enum; the byte-parity test fails if a safetensors release changes it.
_DTYPE_ORDER = {
    "BOOL": 0, "U8": 4, "I8": 5, "F8_E5M2": 6, "F8_E4M3": 7, "I16": 9, "F16": 11, "BF16": 12,
    "I32": 13, "F32": 15, "F64": 17, "I64": 18,
}

_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0 (the whole tensor for 0-d and 1-d tensors of one row)."""
        if not self.shape:
            return self.nbytes
        return self.nbytes // self.shape[0] if self.shape[0] else 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of one safetensors file without reading any tensor data."""
    path = Path(path)
    fix = f"delete {path} and fetch or build it again (for a Hub model: make build re-downloads it)"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; {fix}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file ({size} bytes, no header); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: corrupt safetensors file (header claims {header_len} bytes, file has {size}); {fix}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'; {fix}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{name}' has dtype {dtype_name}, which this pipeline does not read "
                f"(known: {', '.join(DTYPES)})"
            )
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0 or end > data_len:
            raise CheckpointError(
                f"{path}: tensor '{name}' {dtype_name}{list(shape)} needs {expected} bytes at "
                f"[{begin}, {end}) but the data section has {data_len} bytes (truncated or corrupt file); {fix}"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, expected)
    # The format's rule (safetensors' own validation): sorted by offset, the tensors tile the data section with no
    # overlap, no gap and nothing after; two tensors on the same bytes would silently share weights.
    at = 0
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        begin = info.offset - data_start
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise CheckpointError(f"{path}: tensor '{info.name}' starts at data offset {begin}, where {at} was "
                                  f"expected: it {what} (the data offsets must cover the data section contiguously); "
                                  f"{fix}")
        at = begin + info.nbytes
    if at != data_len:
        raise CheckpointError(f"{path}: the tensors cover {at} of the data section's {data_len} bytes (bytes after "
                              f"the last tensor; the data offsets must cover the data section exactly); {fix}")
    return infos


class SafetensorsIndex:
    """The tensors of one Hugging Face checkpoint folder (one file, or shards with an index), by name."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos

    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsIndex:
        folder = Path(folder)
        index_file = folder / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_file}: corrupt index ({exc}); fetch the model again") from None
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{folder}: no *.safetensors files. This pipeline reads safetensors only; convert a "
                f"PyTorch .bin checkpoint with transformers (save_pretrained(..., safe_serialization=True))"
            )
        infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in infos:
                    raise CheckpointError(f"{folder}: tensor '{name}' appears in {infos[name].path.name} and {file.name}")
                infos[name] = info
        return cls(infos)

    @property
    def names(self) -> list[str]:
        return sorted(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (dim 0), read with pread into a fresh tensor."""
        info = self.infos[name]
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for '{name}' with {rows} rows")
        nbytes = (stop - start) * info.row_bytes
        buf = bytearray(nbytes)
        with open(info.path, "rb", buffering=0) as f:
            _pread_into(f.fileno(), buf, info.offset + start * info.row_bytes, info.path)
        tensor = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return tensor.view(info.dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name)


def _pread_into(fd: int, buf: bytearray, offset: int, path: Path) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}; fetch it again")
        done += n


def header_bytes(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header save_file writes for these tensors, and each tensor's [begin, end) in the data section."""
    order = sorted(tensors, key=lambda n: (-_DTYPE_ORDER[DTYPE_NAMES[tensors[n][0]]], n))
    entries: dict[str, dict] = {}
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * dtype.itemsize
        offsets[name] = (cursor, cursor + nbytes)
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Writes one safetensors file whose tensors arrive as row blocks, in any order, from any thread.

    The layout is fixed up front from the declared names, dtypes and shapes. `close()` checks that every
    byte of every tensor was written exactly once, so a conversion bug cannot leave a silent hole.
    """

    def __init__(self, path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        self.tensors = {n: (d, tuple(s)) for n, (d, s) in tensors.items()}
        header, self.offsets = header_bytes(self.tensors)
        self.data_start = len(header)
        total = self.data_start + (max((e for _, e in self.offsets.values()), default=0))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, header, 0)
        os.ftruncate(self._fd, total)
        self._written = {n: 0 for n in self.tensors}
        self._lock = threading.Lock()

    def write_rows(self, name: str, block: torch.Tensor, row_start: int = 0) -> None:
        """Write `block` as rows [row_start, row_start + len(block)) of tensor `name`."""
        dtype, shape = self.tensors[name]
        if block.dtype != dtype:
            raise ValueError(f"{name}: block dtype {block.dtype}, declared {dtype}")
        if tuple(block.shape[1:]) != tuple(shape[1:]) or (shape and row_start + block.shape[0] > shape[0]):
            raise ValueError(f"{name}: block {list(block.shape)} at row {row_start} does not fit declared {list(shape)}")
        begin, end = self.offsets[name]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else end - begin
        data = block.contiguous().view(torch.uint8).reshape(-1).numpy()
        position = self.data_start + begin + row_start * row_bytes
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, memoryview(data)[done:], position + done)
        with self._lock:
            self._written[name] += data.nbytes

    def copy_rows_from_file(self, name: str, row_start: int, source: Path, source_offset: int, nbytes: int) -> None:
        """Copy nbytes of `source` (from source_offset) to tensor `name` from row row_start, inside the kernel
        (copy_file_range, as cp does: no pass through this process's memory); read + write where unsupported."""
        dtype, shape = self.tensors[name]
        begin, end = self.offsets[name]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else end - begin
        position = self.data_start + begin + row_start * row_bytes
        if position + nbytes > self.data_start + end:
            raise ValueError(f"{name}: {nbytes} bytes at row {row_start} overflow the tensor")
        with open(source, "rb", buffering=0) as src:
            done = 0
            try:
                while done < nbytes:
                    n = os.copy_file_range(src.fileno(), self._fd, nbytes - done, source_offset + done,
                                           position + done)
                    if n <= 0:
                        raise OSError("copy_file_range copied nothing")
                    done += n
            except OSError:  # another filesystem, an old kernel: copy through memory
                while done < nbytes:
                    block = os.pread(src.fileno(), min(nbytes - done, 32 << 20), source_offset + done)
                    if not block:
                        raise CheckpointError(f"{source}: unexpected end of file") from None
                    done += os.pwrite(self._fd, block, position + done)
        with self._lock:
            self._written[name] += nbytes

    def close(self) -> None:
        os.close(self._fd)
        for name, (dtype, shape) in self.tensors.items():
            expected = math.prod(shape) * dtype.itemsize
            if self._written[name] != expected:
                raise AssertionError(f"{self.path.name}: tensor {name} got {self._written[name]} of {expected} bytes")

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
