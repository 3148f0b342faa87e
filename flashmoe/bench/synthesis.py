"""A packed model of a preset's shape with random weights (fixed seed), written straight into the
packed format: what `flashmoe bench` measures. Dense weights come from the family's own modules
(their names, shapes and kinds), experts as random records of the requested bits, n-gram tables
(qwen4_exp) as random rows in their own files."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..formats.packed import DENSE_FILE, ExpertFile, Manifest, NgramFile, NgramTableWriter, RecordLayout
from ..formats.safetensors import SafetensorsWriter
from ..layers.ple import table_rows
from ..models import ModelArgs, args_from_dict
from ..models.transformer import Model
from ..moe.block import FP32_TENSORS
from ..quant import MXFP4_GROUP
from ..tokenizer_build import write_byte_tokenizer, write_qwen35_tokenizer

QWEN35_VOCAB = 248077  # ids of the Qwen3.5 tokenizer: models with fewer get a byte-level one


def dense_tensors(args: ModelArgs) -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
    """(name, shape, stored dtype, init kind) of every dense tensor of the model, from its modules."""
    with torch.device("meta"):
        model = Model(args)
    out = []
    for name, t in model.state_dict().items():
        leaf = name.rpartition(".")[2]
        out.append((name, tuple(t.shape), torch.float32 if leaf in FP32_TENSORS else torch.bfloat16, _kind(name, args)))
    return out


def _kind(name: str, args: ModelArgs) -> str:
    """How random_init fills a tensor, by its role."""
    if name.endswith("linear_attn.norm.weight"):
        return "ones"  # the DeltaNet output norm's plain weight
    if "norm" in name.split(".")[-2]:  # input_layernorm, hc_norm, the PLE's norm_key, ...
        return "norm" if args.ZERO_CENTRED_NORMS else "unit_norm"
    for suffix, kind in (("A_log", "a_log"), ("dt_bias", "ones"), ("conv1d.weight", "conv"),
                         ("e_score_correction_bias", "zeros"), (".bias", "zeros")):
        if name.endswith(suffix):
            return kind
    return "linear"


def random_init(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random weights of sane scale (unit-gain linears) on the generator's device."""
    dev = gen.device
    if kind == "linear":
        return torch.randn(shape, generator=gen, device=dev) * (1.0 / math.sqrt(shape[-1]))
    if kind == "conv":
        return torch.randn(shape, generator=gen, device=dev) * 0.5
    if kind in ("norm", "unit_norm"):  # the w of (1 + w), or a weight near 1
        return torch.randn(shape, generator=gen, device=dev) * 0.1 + (kind == "unit_norm")
    if kind in ("ones", "zeros"):
        return torch.full(shape, float(kind == "ones"), device=dev)
    return torch.empty(shape, device=dev).uniform_(1, 16, generator=gen).log()  # a_log


def synthesize(out: Path, cfg: dict, bits: int, group_size: int = 64, seed: int = 0, device="cpu", log=print,
               ngram_bits: int = 16) -> Path:
    """Write a packed model of this shape with random weights straight into `out` (skipped if it is
    already there with the same shape and quantization); n-gram rows (qwen4_exp) of ngram_bits."""
    args = args_from_dict(cfg)
    E = args.moe.num_experts
    layout = record_layout(args, bits, group_size)
    stamp = {"bench_config": cfg, "bits": bits, "group_size": group_size, "seed": seed, "ngram_bits": ngram_bits}
    if (out / "bench.json").exists() and json.loads((out / "bench.json").read_text()) == stamp:
        return out
    dense = dense_tensors(args)
    tables = ngram_table_files(args, ngram_bits)
    need = (len(args.moe_layers) * E * layout.record_size + sum(math.prod(s) * d.itemsize for _, s, d, _ in dense)
            + sum(t.file_size for t in tables))
    _check_disk(out, need)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if args.vocab_size >= QWEN35_VOCAB:
        write_qwen35_tokenizer(out)
    else:  # ids are all the bench needs: a tokenizer that fits any vocabulary
        write_byte_tokenizer(out, args.vocab_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    writer = SafetensorsWriter(out / DENSE_FILE, [(n, d, s) for n, s, d, _ in dense], {"format": "pt"})
    for name, shape, dtype, kind in dense:
        writer.write(name, random_init(shape, kind, gen).to(dtype).cpu())
    writer.close()
    (out / "experts").mkdir(exist_ok=True)
    files = []
    crc_pool = ThreadPoolExecutor(os.cpu_count() or 4)
    for layer in args.moe_layers:
        rel = f"experts/layer_{layer:03d}.bin"
        crcs = []
        with open(out / rel, "wb") as f:
            for start in range(0, E, 32):
                records = random_records(layout, min(32, E - start), gen).cpu().numpy()
                crcs += crc_pool.map(zlib.crc32, list(records))
                f.write(records.data)
            f.flush()
            os.fsync(f.fileno())  # written back now: the disk probe that follows must not race the writeback
        files.append(ExpertFile(layer, rel, E, tuple(crcs)))
        log(f"  synthesized layer {layer}: {E} experts ({time.perf_counter() - t0:.0f} s)")
    if tables:
        (out / "ngrams").mkdir(exist_ok=True)
    for table in tables:
        write_random_ngram_table(out, table, gen)
        log(f"  synthesized layer {table.layer}'s n-gram table: {table.rows:,} rows of {table.row_contents}, "
            f"{table.file_size / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f} s)")
    Manifest(layout, tuple(files), DENSE_FILE, "bfloat16", "flashmoe bench (random weights)", tables).save(out)
    (out / "bench.json").write_text(json.dumps(stamp))
    return out


def ngram_table_files(args: ModelArgs, bits: int = 16) -> tuple[NgramFile, ...]:
    """The n-gram table files of a model of this shape (none for families without them): bfloat16
    rows, or at 8 bits int8 ones with their scales."""
    specs = {i: args.layer(i).ple for i in range(args.num_hidden_layers)}
    dtype = "int8" if bits == 8 else "bfloat16"
    return tuple(NgramFile.for_layer(i, table_rows(spec), spec.width, dtype) for i, spec in specs.items() if spec is not None)


def write_random_ngram_table(out: Path, table: NgramFile, gen: torch.Generator, piece_bytes: int = 64 << 20) -> None:
    """Random rows of unit variance (what a unit-gain projection of them expects), generated and
    written a piece of whole blocks at a time (none carried between pieces), in the format the
    converter writes."""
    rows_per_piece = table.rows_per_block * max(1, piece_bytes // table.block_bytes)
    with open(out / table.file, "wb") as f:
        writer = NgramTableWriter(f, table)
        for start in range(0, table.rows, rows_per_piece):
            n = min(rows_per_piece, table.rows - start)
            rows = torch.randn(n, table.width, generator=gen, device=gen.device)
            writer.write(table.encode(rows).cpu())
        writer.close()
        f.flush()
        os.fsync(f.fileno())  # as the experts: written back before anything is timed


def ngram_tables_report(full: ModelArgs, sliced: ModelArgs, bits: int = 16) -> list[dict]:
    """What a synthesis holds of each n-gram table in the slice, beside the released model's (both
    with rows of `bits`): rows and bytes as stored, and the share of the rows."""
    released = {t.layer: t for t in ngram_table_files(full, bits)}
    return [{"layer": t.layer, "rows": t.rows, "released_rows": released[t.layer].rows,
             "row_share": t.rows / released[t.layer].rows, "file_bytes": t.file_size,
             "released_file_bytes": released[t.layer].file_size, "row_bytes": t.row_bytes}
            for t in ngram_table_files(sliced, bits)]


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _check_disk(out: Path, need: int) -> None:
    """Refuse to start a synthesis that cannot fit: what `out` holds is rewritten, so it counts as
    free; the other models synthesized beside it are named, with their sizes, as what to delete."""
    parent = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(parent).free + _tree_bytes(out)
    if need <= free:
        return
    others = [p for p in sorted(out.parent.glob("*")) if p != out and (p / "bench.json").exists()] if out.parent.exists() else []
    listed = ", ".join(f"{p} ({_tree_bytes(p) / 2**30:.1f} GiB)" for p in others)
    raise RuntimeError(f"synthesizing {out.name} needs {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are free there"
                       + (f"; delete models synthesized earlier ({listed})" if others else "")
                       + ", or pass --workdir on a larger disk")


def record_layout(args: ModelArgs, bits: int, group_size: int = 64) -> RecordLayout:
    """The records bench synthesizes for a model: with the family's expert biases, and at 4 bits in
    the scheme its release ships where that is MXFP4 (gpt-oss)."""
    mxfp4 = bits == 4 and args.RELEASED_SCHEME == "mxfp4"
    return RecordLayout.build(args.hidden_size, args.moe.intermediate, bits, MXFP4_GROUP if mxfp4 else group_size,
                              with_bias=args.moe.expert_bias, scheme="mxfp4" if mxfp4 else "affine")


def random_records(layout: RecordLayout, n: int, gen: torch.Generator) -> torch.Tensor:
    """n expert records: random codes; scales and biases that make each weight row zero-mean with
    unit-gain variance (so activations stay finite through any number of layers); expert biases 0."""
    records = torch.randint(0, 256, (n, layout.record_size), dtype=torch.uint8, generator=gen, device=gen.device)
    for s in layout.segments:
        if s.name.endswith(".bias"):
            records[:, s.offset : s.offset + s.nbytes] = 0  # bf16 zeros
    if layout.bits == 16:
        for s in layout.segments:
            if s.name.endswith(".weight"):
                w = torch.randn(n, *s.shape, generator=gen, device=gen.device) / s.shape[1] ** 0.5
                records[:, s.offset : s.offset + s.nbytes] = w.to(torch.bfloat16).view(n, -1).view(torch.uint8)
        return records
    if layout.scheme == "mxfp4":  # random E2M1 codes have RMS 2.93: one power-of-two scale per row for unit gain
        for s in layout.segments:
            if s.name.endswith(".scales"):
                k = layout.hidden_size if s.name.startswith("gate_up") else layout.intermediate_size
                records[:, s.offset : s.offset + s.nbytes] = 127 + round(math.log2(1 / (2.93 * k**0.5)))
        return records
    levels = (1 << layout.bits) - 1
    code_std = (levels * (levels + 2) / 12) ** 0.5  # std of a uniform code in [0, levels]
    for s in layout.segments:
        if s.name.endswith(".scales"):
            k = layout.hidden_size if s.name.startswith("gate_up") else layout.intermediate_size
            scale = torch.full((n, *s.shape), 1 / (code_std * k**0.5), device=gen.device)
            bias = -scale * levels / 2
            for t, seg_name in ((scale, s.name), (bias, s.name.replace("scales", "biases"))):
                seg = next(x for x in layout.segments if x.name == seg_name)
                records[:, seg.offset : seg.offset + seg.nbytes] = t.to(torch.bfloat16).view(n, -1).view(torch.uint8)
    return records

