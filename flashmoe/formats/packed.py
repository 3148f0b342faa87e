"""The packed model format: manifest, expert record layout, atomic writes. Spec: docs/FORMAT.md."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import quant

FORMAT_NAME = "flashmoe-packed"
FORMAT_VERSION = 1
MANIFEST_FILE = "flashmoe.json"
DENSE_FILE = "dense.safetensors"
RECORD_ALIGN = 4096  # one record = whole pages, so a record read is page-aligned (O_DIRECT-able)
SEGMENT_ALIGN = 256  # each tensor inside a record starts on a 256-byte boundary (coalesced GPU loads)
DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32}


class PackedFormatError(ValueError):
    pass


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class Segment:
    name: str  # e.g. "gate_up_proj.weight", "gate_up_proj.scales"
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the record

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BY_NAME[self.dtype].itemsize


@dataclass(frozen=True, slots=True)
class RecordLayout:
    """Where each tensor of one expert lives inside its fixed-size record.

    Experts are SwiGLU MLPs stored as gate_up_proj [2I, H] (gate rows first, then up rows, as in
    the fused HF layout) and down_proj [H, I]. Quantized: `.weight` packed int32 codes plus
    `.scales` / `.biases` per group; 16-bit: `.weight` alone.
    """

    bits: int
    group_size: int
    hidden_size: int
    intermediate_size: int
    segments: tuple[Segment, ...]
    record_size: int

    @classmethod
    def build(cls, hidden: int, intermediate: int, bits: int, group_size: int, dtype16: str = "bfloat16"):
        shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}
        segments, offset = [], 0
        for proj, (n, k) in shapes.items():
            if bits == 16:
                parts = [(f"{proj}.weight", dtype16, (n, k))]
            else:
                quant.check_shape(k, bits, group_size)
                parts = [
                    (f"{proj}.weight", "int32", (n, k * bits // 32)),
                    (f"{proj}.scales", "bfloat16", (n, k // group_size)),
                    (f"{proj}.biases", "bfloat16", (n, k // group_size)),
                ]
            for name, dtype, shape in parts:
                seg = Segment(name, dtype, shape, offset)
                segments.append(seg)
                offset = _align(offset + seg.nbytes, SEGMENT_ALIGN)
        return cls(bits, group_size, hidden, intermediate, tuple(segments), _align(offset, RECORD_ALIGN))

    @property
    def payload_bytes(self) -> int:
        """Bytes of actual weights in a record (without alignment padding)."""
        return sum(s.nbytes for s in self.segments)

    def views(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-copy typed views of a record's tensors; `record` is a uint8 tensor of record_size bytes."""
        out = {}
        for s in self.segments:
            raw = record[s.offset : s.offset + s.nbytes]
            out[s.name] = raw.view(DTYPE_BY_NAME[s.dtype]).view(s.shape)
        return out

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) in `dtype`, dequantized if the record is quantized."""
        v = self.views(record)
        if self.bits == 16:
            return v["gate_up_proj.weight"].to(dtype), v["down_proj.weight"].to(dtype)
        return tuple(
            quant.dequantize(v[f"{p}.weight"], v[f"{p}.scales"], v[f"{p}.biases"], self.bits, self.group_size, dtype)
            for p in ("gate_up_proj", "down_proj")
        )

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        record = torch.zeros(self.record_size, dtype=torch.uint8)
        for s in self.segments:
            t = tensors[s.name]
            if tuple(t.shape) != s.shape or t.dtype != DTYPE_BY_NAME[s.dtype]:
                raise ValueError(f"{s.name}: expected {s.dtype}{list(s.shape)}, got {t.dtype}{list(t.shape)}")
            record[s.offset : s.offset + s.nbytes] = t.contiguous().reshape(-1).view(torch.uint8)
        return record

    def to_json(self) -> dict:
        d = asdict(self)
        d["segments"] = [asdict(s) for s in self.segments]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RecordLayout":
        segs = tuple(Segment(s["name"], s["dtype"], tuple(s["shape"]), s["offset"]) for s in d["segments"])
        return cls(d["bits"], d["group_size"], d["hidden_size"], d["intermediate_size"], segs, d["record_size"])


@dataclass(frozen=True, slots=True)
class ExpertFile:
    layer: int
    file: str  # relative to the model directory
    num_experts: int
    crc32: tuple[int, ...]  # one per record


@dataclass(frozen=True, slots=True)
class Manifest:
    layout: RecordLayout
    expert_files: tuple[ExpertFile, ...]
    dense_file: str
    dense_dtype: str
    source: str

    def expert_file(self, layer: int) -> ExpertFile:
        for f in self.expert_files:
            if f.layer == layer:
                return f
        raise KeyError(f"no experts stored for layer {layer}")

    @property
    def total_expert_bytes(self) -> int:
        return sum(f.num_experts for f in self.expert_files) * self.layout.record_size

    def save(self, model_dir: Path) -> None:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "dense": {"file": self.dense_file, "dtype": self.dense_dtype},
            "experts": {
                "layout": self.layout.to_json(),
                "files": [asdict(f) for f in self.expert_files],
                "checksum": "crc32",
            },
        }
        atomic_write_text(model_dir / MANIFEST_FILE, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, model_dir: str | Path) -> "Manifest":
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST_FILE
        if not path.exists():
            hint = (
                " It looks like an unconverted Hugging Face checkpoint: run `flashmoe convert "
                f"{model_dir} OUT_DIR` first."
                if (model_dir / "config.json").exists()
                else ""
            )
            raise PackedFormatError(f"{path} not found: {model_dir} is not a flashmoe model directory.{hint}")
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT_NAME:
                raise PackedFormatError(f"{path}: not a {FORMAT_NAME} manifest")
            if doc.get("format_version") != FORMAT_VERSION:
                raise PackedFormatError(
                    f"{path}: format version {doc.get('format_version')} but this flashmoe reads version "
                    f"{FORMAT_VERSION}; re-run flashmoe convert"
                )
            files = tuple(
                ExpertFile(f["layer"], f["file"], f["num_experts"], tuple(f["crc32"])) for f in doc["experts"]["files"]
            )
            return cls(
                RecordLayout.from_json(doc["experts"]["layout"]),
                files,
                doc["dense"]["file"],
                doc["dense"]["dtype"],
                doc.get("source", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, PackedFormatError):
                raise
            raise PackedFormatError(f"{path} is malformed ({e!r}); re-run flashmoe convert") from None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
