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
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

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
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as it claims to be."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int
    path: Path


def read_into(fd: int, out: torch.Tensor, offset: int, path: Path | str = "?") -> None:
    """Fill a contiguous CPU tensor with bytes from `fd` at `offset` (pread until complete)."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
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
            self.tensors, self.metadata = self._parse_header()
        except Exception:
            os.close(self.fd)
            raise

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{self.path}: header length {n} is impossible for a {size}-byte file (corrupt?)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        tensors = {}
        for name, h in header.items():
            if h["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {h['dtype']}")
            begin, end = h["data_offsets"]
            dtype = DTYPES[h["dtype"]]
            shape = tuple(h["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name} byte range does not match its shape")
            if base + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name} ends at byte {base + end} but the file has {size} bytes "
                    "(truncated download? fetch the file again)"
                )
            tensors[name] = TensorInfo(name, dtype, shape, base + begin, end - begin, self.path)
        return tensors, metadata

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
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            shard_names = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not shard_names:
            pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            hint = f" (found {pickles[0]}: pickled weights are never loaded; re-save with safetensors)" if pickles else ""
            raise FileNotFoundError(f"no .safetensors files in {self.dir}{hint}")
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        for shard in shard_names:
            if not (self.dir / shard).exists():
                raise FileNotFoundError(f"{self.dir / shard} is listed in the index but missing (incomplete download?)")
            f = SafetensorsFile(self.dir / shard)
            self.files.append(f)
            self.where.update({name: f for name in f.tensors})

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

