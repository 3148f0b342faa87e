"""The packed model format: manifest, expert record layout, n-gram table files, atomic writes.
Spec: docs/FORMAT.md."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch

from .. import quant
from ..utils import atomic_write_text, is_int, read_json, short_repr

FORMAT_NAME = "flashmoe-packed"
FORMAT_VERSION = 1
MANIFEST_FILE = "flashmoe.json"
DENSE_FILE = "dense.safetensors"
RECORD_ALIGN = 4096  # one record = whole pages, so a record read is page-aligned (O_DIRECT-able)
SEGMENT_ALIGN = 256  # each tensor inside a record starts on a 256-byte boundary (coalesced GPU loads)
# An n-gram table is read a page at a time: hashed rows are scattered, so a token's rows lie on as
# many pages as it has rows, and a page is the least a disk (or O_DIRECT) reads anyway.
NGRAM_BLOCK = 4096
DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int32": torch.int32, "uint8": torch.uint8,
                 "int8": torch.int8, "float32": torch.float32}
SCHEMES = ("affine", "mxfp4")
DENSE_DTYPES = ("bfloat16", "float16")
NGRAM_BITS = (16, 8)
NGRAM_DTYPES = (*DENSE_DTYPES, "int8")
NGRAM_SCALE_DTYPE = "float32"  # 8-bit rows' scale: exact, whatever the row's magnitude (fp16 underflows)
REBUILD = "; run flashmoe convert again to rebuild the model"


class PackedFormatError(ValueError):
    pass


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _check_bits(bits: int) -> None:
    if bits not in (16, *quant.QUANT_BITS):
        raise ValueError(f"--bits must be 16, 8, 4 or 2, not {bits}")


def default_ngram_bits(expert_bits: int | None) -> int:
    """N-gram rows' bits when none are asked for: 16 beside 16-bit experts (a reference keeps every
    value), else 8 (half the disk and twice the rows a row cache holds; the error: docs/FORMAT.md)."""
    return 16 if expert_bits == 16 else 8


def check_ngram_bits(bits: int) -> None:
    if bits not in NGRAM_BITS:
        raise ValueError(f"--ngram-bits must be 16 (the checkpoint's values) or 8 (int8 codes and a float32 scale per "
                         f"row), not {bits}")


def check_quantization(bits: int, group_size: int) -> None:
    """What a conversion accepts: a layout the kernels run, whose quantization groups are a power of
    two (their tiles are) and fill whole 32-bit words (the CPU kernel reads words). Models converted
    otherwise still load (RecordLayout.build asks less), through the slower reference paths."""
    _check_bits(bits)
    least = 32 // bits
    if bits != 16 and (group_size < least or group_size & (group_size - 1)):
        raise ValueError(
            f"--group-size {group_size} cannot quantize at {bits} bits: use a power of two of at least {least}, "
            "e.g. 32, 64 or 128"
        )


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
    `.scales` / `.biases` per group; 16-bit: `.weight` alone; MXFP4 (`scheme` "mxfp4", kept as
    released): `.blocks` uint8 [N, K/2] and `.scales` uint8 [N, K/32]. Experts with biases
    (gpt-oss, `with_bias`) add `.bias` [2I] and [H] after each projection's tensors, 16-bit.
    """

    bits: int
    group_size: int
    hidden_size: int
    intermediate_size: int
    segments: tuple[Segment, ...]
    record_size: int
    with_bias: bool = False
    scheme: str = "affine"  # the quantized codes: MLX-style affine groups, or MXFP4

    @classmethod
    def build(cls, hidden: int, intermediate: int, bits: int, group_size: int, dtype16: str = "bfloat16",
              with_bias: bool = False, scheme: str = "affine"):
        _check_bits(bits)
        if scheme not in SCHEMES:
            raise ValueError(f"the records' quantization scheme must be one of {', '.join(SCHEMES)}, not {short_repr(scheme)}")
        if scheme == "mxfp4" and (bits, group_size) != (4, quant.MXFP4_GROUP):
            raise ValueError(f"MXFP4 records hold 4-bit codes in groups of {quant.MXFP4_GROUP}, not {bits}-bit in groups of {group_size}")
        if bits != 16 and group_size < 1:  # what no layout holds (modulo by 0 below)
            raise ValueError(f"--group-size {group_size} cannot quantize: a group holds at least one weight")
        shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}
        segments, offset = [], 0
        for proj, (n, k) in shapes.items():
            if bits == 16:
                parts = [(f"{proj}.weight", dtype16, (n, k))]
            elif scheme == "mxfp4":
                if k % quant.MXFP4_GROUP:
                    raise ValueError(f"MXFP4 needs input dimensions that are multiples of {quant.MXFP4_GROUP}, not {k}")
                parts = [(f"{proj}.blocks", "uint8", (n, k // 2)), (f"{proj}.scales", "uint8", (n, k // quant.MXFP4_GROUP))]
            else:
                quant.check_shape(k, bits, group_size)
                parts = [
                    (f"{proj}.weight", "int32", (n, k * bits // 32)),
                    (f"{proj}.scales", "bfloat16", (n, k // group_size)),
                    (f"{proj}.biases", "bfloat16", (n, k // group_size)),
                ]
            if with_bias:
                parts.append((f"{proj}.bias", dtype16, (n,)))
            for name, dtype, shape in parts:
                seg = Segment(name, dtype, shape, offset)
                segments.append(seg)
                offset = _align(offset + seg.nbytes, SEGMENT_ALIGN)
        return cls(bits, group_size, hidden, intermediate, tuple(segments), _align(offset, RECORD_ALIGN), with_bias, scheme)

    @property
    def payload_bytes(self) -> int:
        """Bytes of actual weights in a record (without alignment padding)."""
        return sum(s.nbytes for s in self.segments)

    def views(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero-copy typed views of a record's tensors; `record` is a uint8 tensor of record_size bytes
        (or [n, record_size]: n records, each view then [n, ...])."""
        out = {}
        for s in self.segments:
            raw = record[..., s.offset : s.offset + s.nbytes]
            out[s.name] = raw.view(DTYPE_BY_NAME[s.dtype]).view(*record.shape[:-1], *s.shape)
        return out

    def weights(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) in `dtype`, dequantized if the record is quantized; for
        records [n, record_size], [n, 2I, H] and [n, H, I] in one pass."""
        v = self.views(record)
        if self.bits == 16:
            return v["gate_up_proj.weight"].to(dtype), v["down_proj.weight"].to(dtype)
        if self.scheme == "mxfp4":
            return tuple(quant.dequantize_mxfp4(v[f"{p}.blocks"], v[f"{p}.scales"], dtype) for p in ("gate_up_proj", "down_proj"))
        return tuple(
            quant.dequantize(v[f"{p}.weight"], v[f"{p}.scales"], v[f"{p}.biases"], self.bits, self.group_size, dtype)
            for p in ("gate_up_proj", "down_proj")
        )

    def biases(self, record: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up bias [2I], down bias [H]) in `dtype`, or None for experts without biases."""
        if not self.with_bias:
            return None
        v = self.views(record)
        return v["gate_up_proj.bias"].to(dtype), v["down_proj.bias"].to(dtype)

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
        d["segments"] = [{**asdict(s), "shape": list(s.shape)} for s in self.segments]  # as JSON reads it back
        # keys at their defaults are left out: manifests written before they existed read back unchanged
        if not self.with_bias:
            del d["with_bias"]
        if self.scheme == "affine":
            del d["scheme"]
        return d

    @classmethod
    def from_json(cls, d: Any) -> "RecordLayout":
        """The layout a manifest describes. It must be the one `build` makes from its sizes: offsets and
        shapes address memory, so they are never taken from a file alone. Raises ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"experts.layout is {short_repr(d)}, not an object")
        sizes = [d.get(key) for key in ("hidden_size", "intermediate_size", "bits", "group_size")]
        if not all(is_int(n) for n in sizes) or min(sizes[:2]) < 1:  # build checks bits and group_size
            raise ValueError(
                f"experts.layout sizes, bits and group size are {short_repr(sizes)}: not integers, or a size below 1"
            )
        with_bias = d.get("with_bias", False)
        if not isinstance(with_bias, bool):
            raise ValueError(f"experts.layout.with_bias is {short_repr(with_bias)}, not true or false")
        layout = cls.build(*sizes, with_bias=with_bias, scheme=d.get("scheme", "affine"))
        if layout.to_json() != d:
            raise ValueError(
                "experts.layout's segments or record_size are not what its bits, group_size and sizes give"
            )
        return layout


@dataclass(frozen=True, slots=True)
class ExpertFile:
    layer: int
    file: str  # relative to the model directory
    num_experts: int
    crc32: tuple[int, ...]  # one per record


@dataclass(frozen=True, slots=True)
class NgramFile:
    """One layer's n-gram embedding table (Qwen4-Exp's per-layer embeddings): `rows` rows of `width`
    values, 16-bit, or int8 codes followed by the row's float32 scale, packed into NGRAM_BLOCK-byte
    blocks of `rows_per_block` whole rows (zero padding after them), block b at byte b * NGRAM_BLOCK;
    after the last block, one little-endian CRC-32 per block."""

    layer: int
    file: str  # relative to the model directory
    rows: int
    width: int
    dtype: str  # "bfloat16" or "float16"; "int8" with a scale per row
    scale_dtype: str | None = None  # NGRAM_SCALE_DTYPE for int8 rows, None for 16-bit ones

    @property
    def row_bytes(self) -> int:
        scale = DTYPE_BY_NAME[self.scale_dtype].itemsize if self.scale_dtype else 0
        return self.width * DTYPE_BY_NAME[self.dtype].itemsize + scale

    @property
    def row_contents(self) -> str:
        """What a stored row holds, in words (for errors)."""
        return f"{self.width} {self.dtype} " + (f"codes and a {self.scale_dtype} scale" if self.scale_dtype else "values")

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of values [n, width] (any float dtype) -> as stored [n, row_bytes] uint8. 8-bit:
        symmetric absmax per row, codes round(v / scale) in [-127, 127], scale = max |v| / 127."""
        if self.dtype != "int8":
            return values.to(DTYPE_BY_NAME[self.dtype]).contiguous().view(torch.uint8)
        values = values.float()
        scale = values.abs().amax(1, keepdim=True) / 127
        codes = torch.round(values / torch.where(scale > 0, scale, 1)).clamp(-127, 127).to(torch.int8)
        return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], 1)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows [..., row_bytes] (uint8, on any device) -> their values [..., width]: 16-bit
        ones as stored, 8-bit ones in float32."""
        if self.dtype != "int8":
            return rows.view(DTYPE_BY_NAME[self.dtype])
        scale = rows[..., self.width :].contiguous().view(DTYPE_BY_NAME[self.scale_dtype])
        return rows[..., : self.width].view(torch.int8).float() * scale

    @property
    def block_bytes(self) -> int:
        """Whole pages holding at least one row (one page unless a row is wider)."""
        return _align(self.row_bytes, NGRAM_BLOCK)

    @property
    def rows_per_block(self) -> int:
        return self.block_bytes // self.row_bytes

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.rows_per_block)

    @property
    def crc_offset(self) -> int:
        return self.blocks * self.block_bytes

    @property
    def file_size(self) -> int:
        return self.crc_offset + 4 * self.blocks

    @classmethod
    def for_layer(cls, layer: int, rows: int, width: int, dtype: str = "bfloat16") -> "NgramFile":
        """Layer `layer`'s table, in the file a packed model keeps it in (int8 rows with their scale)."""
        return cls(layer, f"ngrams/layer_{layer:03d}.bin", rows, width, dtype, NGRAM_SCALE_DTYPE if dtype == "int8" else None)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}  # 16-bit tables: no scale_dtype


class NgramTableWriter:
    """Writes one n-gram table file from rows streamed in order, in pieces of any size: whole
    blocks are written as they fill (a partial one is carried to the next piece), the CRC-32s at
    close. Memory: a few copies of one piece, however large the table."""

    def __init__(self, f: BinaryIO, table: NgramFile):
        self.f, self.table = f, table
        self.carried = torch.empty(0, table.row_bytes, dtype=torch.uint8)
        self.crcs: list[np.ndarray] = []
        self.rows_written = 0

    def write(self, rows: torch.Tensor) -> None:
        """The next rows [n, row_bytes] (uint8, the values' little-endian bytes)."""
        self.rows_written += rows.shape[0]
        if self.rows_written > self.table.rows:
            raise ValueError(f"layer {self.table.layer}'s n-gram table has {self.table.rows} rows; {self.rows_written} were written")
        rows = torch.cat([self.carried, rows]) if self.carried.shape[0] else rows
        whole = rows.shape[0] // self.table.rows_per_block * self.table.rows_per_block  # rows that fill blocks
        self._write_blocks(rows[:whole])
        self.carried = rows[whole:].clone()  # not a view: the caller may reuse its buffer

    def close(self) -> None:
        """The last (zero-padded) block, then one CRC-32 per block."""
        if self.rows_written != self.table.rows:
            raise ValueError(f"layer {self.table.layer}'s n-gram table has {self.table.rows} rows; {self.rows_written} were written")
        self._write_blocks(self.carried)
        self.f.write(np.concatenate(self.crcs).astype("<u4").tobytes())

    def _write_blocks(self, rows: torch.Tensor) -> None:
        """Rows [n, row_bytes] as ceil(n / rows_per_block) zero-padded blocks, their CRC-32s kept."""
        t, n = self.table, rows.shape[0]
        count, whole = -(-n // t.rows_per_block), n // t.rows_per_block
        blocks = torch.empty(count, t.block_bytes, dtype=torch.uint8)  # each byte written once: no zeroing pass
        blocks[:, t.rows_per_block * t.row_bytes :] = 0
        slots = blocks[:, : t.rows_per_block * t.row_bytes].unflatten(1, (t.rows_per_block, t.row_bytes))
        slots[:whole] = rows[: whole * t.rows_per_block].reshape(whole, t.rows_per_block, t.row_bytes)
        if whole < count:  # the table's last rows: a block part filled
            slots[whole, : n - whole * t.rows_per_block] = rows[whole * t.rows_per_block :]
            slots[whole, n - whole * t.rows_per_block :] = 0
        data = blocks.numpy()
        self.f.write(data.data)
        self.crcs.append(np.fromiter((zlib.crc32(block) for block in data), dtype=np.uint32, count=count))


@dataclass(frozen=True, slots=True)
class Manifest:
    layout: RecordLayout
    expert_files: tuple[ExpertFile, ...]
    dense_file: str
    dense_dtype: str
    source: str
    ngram_files: tuple[NgramFile, ...] = ()  # families with n-gram embeddings (qwen4_exp) only

    def expert_file(self, layer: int) -> ExpertFile:
        for f in self.expert_files:
            if f.layer == layer:
                return f
        raise KeyError(f"no experts stored for layer {layer}")

    def check(self, hidden: int, intermediate: int, num_experts: int, moe_layers: list[int], with_bias: bool = False) -> None:
        """Raise PackedFormatError unless the records hold experts of this shape for exactly these
        layers (the model's config.json and its packed experts must describe one model)."""
        lay, layers = self.layout, sorted(f.layer for f in self.expert_files)
        problems = []
        if (lay.hidden_size, lay.intermediate_size) != (hidden, intermediate):
            problems.append(f"its experts are {lay.hidden_size} x {lay.intermediate_size}, config.json says {hidden} x {intermediate}")
        if lay.with_bias != with_bias:
            problems.append(f"its experts {'have' if lay.with_bias else 'lack'} biases, the family's {'have' if with_bias else 'do not'}")
        if layers != sorted(moe_layers):
            problems.append(f"it stores experts of layers {layers}, config.json has MoE layers {sorted(moe_layers)}")
        if counts := sorted({f.num_experts for f in self.expert_files} - {num_experts}):
            problems.append(f"its layers hold {counts[0]} experts, config.json says {num_experts}")
        if problems:
            raise PackedFormatError(f"{MANIFEST_FILE} does not match config.json: {'; '.join(problems)}. "
                                    "Convert the checkpoint again (or restore the config.json that came with it)")

    def check_ngrams(self, tables: dict[int, tuple[int, int]]) -> None:
        """Raise PackedFormatError unless the n-gram files hold exactly these tables: layer -> (rows,
        width), what config.json gives."""
        stored = {f.layer: (f.rows, f.width) for f in self.ngram_files}
        if stored == tables:
            return
        if tables and not stored:
            problem = (f"it stores no n-gram tables, but config.json's model reads them at layers {sorted(tables)} "
                       "(a model converted before they moved to files of their own keeps them in its dense weights)")
        else:
            problem = f"it stores n-gram tables (layer: rows, width) {stored}, config.json gives {tables}"
        raise PackedFormatError(f"{MANIFEST_FILE} does not match config.json: {problem}. Convert the checkpoint again")

    @property
    def total_ngram_bytes(self) -> int:
        """Bytes of n-gram rows (without padding or checksums)."""
        return sum(f.rows * f.row_bytes for f in self.ngram_files)

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
        if self.ngram_files:  # left out otherwise: manifests of other families read back unchanged
            doc["ngrams"] = {"block_bytes": NGRAM_BLOCK, "files": [f.to_json() for f in self.ngram_files], "checksum": "crc32"}
        atomic_write_text(model_dir / MANIFEST_FILE, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, model_dir: str | Path) -> "Manifest":
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST_FILE
        if not path.is_file():
            raise _not_a_model(model_dir)
        doc = read_json(path, PackedFormatError, REBUILD)
        try:
            return cls._from_json(doc)
        except ValueError as e:  # the problem in the document: name the file, and the fix
            raise PackedFormatError(f"{path}: {e}{REBUILD}") from None

    @classmethod
    def _from_json(cls, doc: Any) -> "Manifest":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format version {short_repr(doc.get('format_version'))} but this flashmoe reads version {FORMAT_VERSION}"
            )
        dense, experts, source = doc.get("dense"), doc.get("experts"), doc.get("source", "")
        if not isinstance(dense, dict) or dense.get("dtype") not in DENSE_DTYPES:
            raise ValueError(f"dense is {short_repr(dense)}, not {{file, dtype}} with dtype {' or '.join(DENSE_DTYPES)}")
        if not isinstance(experts, dict) or not isinstance(experts.get("files"), list) or not isinstance(source, str):
            raise ValueError("experts is not an object with a list of files, or source is not a string")
        files = tuple(_expert_file(f, i) for i, f in enumerate(experts["files"]))
        if len({f.layer for f in files}) != len(files):
            raise ValueError("experts.files lists a layer twice")
        layout = RecordLayout.from_json(experts.get("layout"))
        ngrams = _ngram_files(doc.get("ngrams", {"block_bytes": NGRAM_BLOCK, "files": []}))
        return cls(layout, files, _file_inside(dense.get("file"), "dense.file"), dense["dtype"], source, ngrams)


def _not_a_model(model_dir: Path) -> PackedFormatError:
    """The error for a --model that is not a packed model directory, saying what it is instead."""
    if not model_dir.exists():
        what = "does not exist"
    elif not model_dir.is_dir():
        what = "is a file"
    else:
        what = f"has no {MANIFEST_FILE}"
    hint = (
        f" It looks like an unconverted Hugging Face checkpoint: run `flashmoe convert {model_dir} OUT_DIR` first."
        if (model_dir / "config.json").exists()
        else " Pass a directory written by `flashmoe convert`."
    )
    return PackedFormatError(f"{model_dir} {what}: it is not a flashmoe model directory.{hint}")


def _file_inside(value: Any, key: str) -> str:
    """A manifest's file name, which must stay inside the model directory (never /etc/..., never ../..)."""
    parts = PurePosixPath(value).parts if isinstance(value, str) and "\0" not in value else ()
    if not parts or parts[0] == "/" or ".." in parts:
        raise ValueError(f"{key} is {short_repr(value)}, not a file name inside the model directory")
    return value


def _expert_file(f: Any, i: int) -> ExpertFile:
    """experts.files[i]: which layer's experts a file holds, how many, and one CRC-32 per record."""
    key = f"experts.files[{i}]"
    if not isinstance(f, dict):
        raise ValueError(f"{key} is {short_repr(f)}, not an object")
    layer, count, crcs = f.get("layer"), f.get("num_experts"), f.get("crc32")
    if not (is_int(layer) and layer >= 0 and is_int(count) and count > 0):
        raise ValueError(f"{key} has layer {short_repr(layer)} and num_experts {short_repr(count)}; both must be counts")
    if not (isinstance(crcs, list) and len(crcs) == count and all(is_int(c) and 0 <= c < 2**32 for c in crcs)):
        raise ValueError(f"{key}.crc32 is not a list of {count} CRC-32 values, one per expert")
    return ExpertFile(layer, _file_inside(f.get("file"), f"{key}.file"), count, tuple(crcs))


def _ngram_files(doc: Any) -> tuple[NgramFile, ...]:
    """The manifest's `ngrams`: which layer's table each file holds, and its shape."""
    if not isinstance(doc, dict) or doc.get("block_bytes") != NGRAM_BLOCK or not isinstance(doc.get("files"), list):
        raise ValueError(f"ngrams is {short_repr(doc)}, not an object with block_bytes {NGRAM_BLOCK} and a list of files")
    files = []
    for i, f in enumerate(doc["files"]):
        key = f"ngrams.files[{i}]"
        sizes = [f.get(k) for k in ("layer", "rows", "width")] if isinstance(f, dict) else [None]
        if not all(is_int(n) for n in sizes) or sizes[0] < 0 or min(sizes[1:]) < 1 or f.get("dtype") not in NGRAM_DTYPES:
            raise ValueError(f"{key} is {short_repr(f)}: not {{layer, file, rows, width}} counts and a dtype, 16-bit or int8")
        scale = f.get("scale_dtype")
        if scale != (NGRAM_SCALE_DTYPE if f["dtype"] == "int8" else None):
            raise ValueError(f"{key} has dtype {f['dtype']} and scale_dtype {short_repr(scale)}: int8 rows need scale_dtype "
                             f"{NGRAM_SCALE_DTYPE!r} (each row ends with its scale), 16-bit rows none")
        files.append(NgramFile(sizes[0], _file_inside(f.get("file"), f"{key}.file"), sizes[1], sizes[2], f["dtype"], scale))
    if len({f.layer for f in files}) != len(files):
        raise ValueError("ngrams.files lists a layer twice")
    return tuple(files)
