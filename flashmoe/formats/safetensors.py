"""safetensors read with `os.pread` and written as a stream.

The reference library memory-maps whole files, so every tensor a converter touches stays in its
resident set; reading each tensor (or one row of it) with pread keeps memory bounded by what is
held, which is what lets `flashmoe convert` run on checkpoints far larger than RAM. The writer
takes the header up front and then the tensors one at a time, for the same reason.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
[begin, end]}, "__metadata__": {str: str}}, then the data buffer (offsets relative to its start).
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils import is_int, parse_json, read_json, short_repr

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U32": torch.uint32,  # mlx-lm's packed codes
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # block-FP8 checkpoints' UE8M0 scales
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
MAX_DIM = 2**63 - 1  # torch sizes are int64
INDEX_FILE = "model.safetensors.index.json"
REFETCH = "; fetch the file again"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as it claims to be."""


def _is_size_list(value: Any) -> bool:
    """A JSON list of integers in [0, MAX_DIM] (a shape, or data offsets)."""
    return isinstance(value, list) and all(is_int(v) and 0 <= v <= MAX_DIM for v in value)


def _byte_count(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor of `shape`, or None past `limit`: the product stops growing there, so a
    hostile shape of thousands of huge dimensions costs no time."""
    if 0 in shape:
        return 0
    n = itemsize
    for dim in shape:
        n *= dim
        if n > limit:
            return None
    return n


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int
    path: Path


def read_into(fd: int, out: torch.Tensor | np.ndarray, offset: int, path: Path | str = "?") -> None:
    """Fill a contiguous CPU tensor (or numpy array: no conversion per call, for readers of many
    small blocks) with bytes from `fd` at `offset` (pread until complete)."""
    array = out.reshape(-1).view(torch.uint8).numpy() if isinstance(out, torch.Tensor) else out
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done} (file truncated?)")
        done += n


class SafetensorsFile:
    """One .safetensors file: header parsed at open, tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise CheckpointError(f"{self.path} is not a regular file, so not a safetensors shard")
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path}: header length {n} is impossible for a {size}-byte file (corrupt?)")
        header = parse_json(os.pread(self.fd, n, 8), f"the header of {self.path}", CheckpointError, REFETCH)
        if not isinstance(header, dict):
            kind = type(header).__name__
            raise CheckpointError(f"{self.path}: the header is a JSON {kind}, not an object of tensors (not a safetensors file?)")
        metadata = header.pop("__metadata__", None) or {}
        if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise CheckpointError(
                f"{self.path}: __metadata__ is {short_repr(metadata)}, not an object of strings{REFETCH}"
            )
        tensors = {name: self._tensor_info(name, entry, 8 + n, size) for name, entry in header.items()}
        self._check_disjoint(tensors)
        return tensors, metadata

    def _tensor_info(self, name: str, entry: Any, base: int, size: int) -> TensorInfo:
        """One header entry {dtype, shape, data_offsets}, checked against the file's `size` (data from byte `base`):
        what is accepted here can be read without reading past the file or overflowing a torch size."""
        where = f"{self.path}: tensor {short_repr(name)}"
        if not isinstance(entry, dict):
            raise CheckpointError(
                f"{where} is described by {short_repr(entry)}, not an object with dtype, shape and data_offsets{REFETCH}"
            )
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(
                f"{where} has unsupported dtype {short_repr(dtype_name)}; flashmoe reads {', '.join(DTYPES)}"
            )
        if not _is_size_list(shape):
            raise CheckpointError(f"{where} has shape {short_repr(shape)}, not a list of sizes{REFETCH}")
        if _byte_count([dim for dim in shape if dim], 1, limit=MAX_DIM) is None:  # strides overflow even when empty
            raise CheckpointError(
                f"{where} has shape {short_repr(shape)}, more elements than a tensor can index{REFETCH}"
            )
        if not (_is_size_list(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            raise CheckpointError(
                f"{where} has data_offsets {short_repr(offsets)}, not [begin, end] with begin <= end{REFETCH}"
            )
        begin, end = offsets
        dtype = DTYPES[dtype_name]
        if _byte_count(shape, dtype.itemsize, limit=end - begin) != end - begin:
            raise CheckpointError(f"{where} byte range does not match its shape{REFETCH}")
        if base + end > size:
            raise CheckpointError(
                f"{where} ends at byte {base + end} but the file has {size} bytes (truncated download? fetch the file again)"
            )
        return TensorInfo(name, dtype, tuple(shape), base + begin, end - begin, self.path)

    def _check_disjoint(self, tensors: dict[str, TensorInfo]) -> None:
        """Refuse tensors that share bytes: the format lays them end to end, so an overlap is a corrupt or
        crafted header."""
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(
                    f"{self.path}: tensors {short_repr(first)} and {short_repr(second)} overlap in the file{REFETCH}"
                )

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        read_into(self.fd, out, info.offset, self.path)
        return out

    def read_row(self, name: str, index: int) -> torch.Tensor:
        """Read `tensor[index]` alone: the rows of the first dimension are contiguous on disk."""
        info = self.tensors[name]
        out = torch.empty(info.shape[1:], dtype=info.dtype)
        read_into(self.fd, out, info.offset + index * out.numel() * info.dtype.itemsize, self.path)
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Checkpoint:
    """All the safetensors shards of a Hugging Face model directory, addressed by tensor name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.exists():
            shard_names = _shards_in_index(index)
        else:
            shard_names = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not shard_names:
            pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            hint = f" (found {pickles[0]}: pickled weights are never loaded; re-save with safetensors)" if pickles else ""
            raise FileNotFoundError(f"no .safetensors files in {self.dir}{hint}")
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        try:
            for shard in shard_names:
                self._open(shard)
        except BaseException:
            self.close()
            raise

    def _open(self, shard: str) -> None:
        if not (self.dir / shard).exists():
            raise CheckpointError(f"{self.dir / shard} is listed in {INDEX_FILE} but missing (incomplete download?)")
        f = SafetensorsFile(self.dir / shard)
        self.files.append(f)
        for name in f.tensors:
            if name in self.where:
                raise CheckpointError(
                    f"{self.dir}: tensor {short_repr(name)} is stored twice, in {self.where[name].path.name} and {shard}: "
                    "remove the shard that does not belong to this checkpoint"
                )
            self.where[name] = f

    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    def read_row(self, name: str, index: int) -> torch.Tensor:
        return self.where[name].read_row(name, index)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shards_in_index(index: Path) -> list[str]:
    """The shard files an index's weight_map names: plain file names beside it, never paths elsewhere."""
    fix = "; fetch it again, or delete it if the model is one model.safetensors"
    doc = read_json(index, CheckpointError, fix)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map (an object of tensor name -> shard file){fix}")
    for shard in weight_map.values():
        if not (isinstance(shard, str) and shard not in ("", ".", "..") and "\0" not in shard and Path(shard).name == shard):
            raise CheckpointError(f"{index} names the shard {short_repr(shard)}, not a file name beside it{fix}")
    return sorted(set(weight_map.values()))


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time, in order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.order = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.order[self.next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"writer expected {want_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise ValueError(f"writer closed after {self.next} of {len(self.order)} tensors")
        self.file.close()


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    writer = SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()

