"""`flashmoe convert`: a Hugging Face checkpoint -> the packed format (docs/FORMAT.md), once.

Tensors are read one at a time (experts one expert at a time, even from fused [E, ...] tensors),
so memory stays a small multiple of the largest single tensor. Everything is written into a
hidden temporary directory that is renamed into place only when complete. Nothing the user owns
is deleted: the destination may not be or hold the source, and --force replaces only a model
directory that an earlier conversion wrote, swapped out whole once the new one is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from . import quant
from .formats.packed import (DENSE_FILE, MANIFEST_FILE, ExpertFile, Manifest, NgramFile, NgramTableWriter, PackedFormatError,
                              RecordLayout, check_ngram_bits, check_quantization,
                              default_ngram_bits)
from .formats.fp8 import SCALE_SUFFIX as FP8_SCALE_SUFFIX
from .formats.fp8 import block_size as fp8_block_size
from .formats.fp8 import dequantize as fp8_dequantize
from .formats.mlx import MlxQuantization
from .formats.mlx import dequantize as mlx_dequantize
from .formats.safetensors import Checkpoint, SafetensorsWriter
from .layers.ple import NGRAM_SHARD, shard_rows
from .models import ModelArgs, names, read_args, sanitize
from .models.names import CheckpointNames
from .models.transformer import Model
from .moe.block import FP32_TENSORS
from .tokenizer import Tokenizer
from .utils import read_json

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


class ConversionError(ValueError):
    pass


@dataclass
class ConversionReport:
    out_dir: Path
    seconds: float = 0.0
    expert_bytes: int = 0
    dense_bytes: int = 0
    ngram_bytes: int = 0  # n-gram table files (qwen4_exp), padding and checksums included
    # per tensor kind: [sum of squared error, sum of squared weights]
    error_sums: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    warnings: list[str] = field(default_factory=list)  # what the user must still do before the model is usable
    experts: str = ""  # what became of the experts: kept as released, or converted to what

    def relative_errors(self) -> dict[str, float]:
        return {k: (e / max(w, 1e-30)) ** 0.5 for k, (e, w) in self.error_sums.items()}


@dataclass
class _Plan:
    dense: list[str]  # checkpoint names of dense tensors, in write order
    experts: dict[int, dict]  # layer -> {"fused": {proj: name}} or {"split": {(expert, proj): name}}
    bytes_total: int
    mxfp4: bool  # the experts are MXFP4 blocks and scales (gpt-oss's release)
    mlx: MlxQuantization | None = None  # an mlx-lm quantized checkpoint's quantization
    mlx_experts: tuple[int, int] | None = None  # its experts' (bits, group size), where they are quantized
    fp8: tuple[int, int] | None = None  # a block-FP8 checkpoint's blocks (weights with `weight_scale_inv`)
    ngrams: dict[int, dict[int, str]] = field(default_factory=dict)  # layer -> shard -> name of its n-gram table's blocks


def convert(
    src: str | Path,
    dst: str | Path,
    bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
    console: Console | None = None,
    ngram_bits: int | None = None,
) -> ConversionReport:
    """`bits` None: quantized experts are kept as stored (gpt-oss's MXFP4 release; mlx-lm's affine
    groups, repacked), others quantized to 4 bits. `ngram_bits`: the n-gram tables' rows (qwen4_exp),
    16-bit as the checkpoint's or 8-bit with a scale per row; None: default_ngram_bits."""
    src, dst = Path(src), Path(dst)
    console = console or Console(stderr=True)
    check_quantization(4 if bits is None else bits, group_size)
    ngram_bits = default_ngram_bits(bits) if ngram_bits is None else ngram_bits
    check_ngram_bits(ngram_bits)
    _check_apart(src, dst)  # before anything is read or removed
    _clean_up_dead_runs(dst)  # first: a model a killed --force run set aside goes back to dst
    _check_destination(dst, force)
    cfg = read_args(src)
    raw = read_json(src / "config.json", ConversionError, "")
    mlx, fp8 = MlxQuantization.from_config(raw), fp8_block_size(raw)
    report = ConversionReport(dst, warnings=_check_tokenizer(src, dst, cfg))
    started = time.perf_counter()
    with Checkpoint(src) as ckpt:
        plan = _plan(cfg, ckpt, mlx, fp8)
        layout = _layout(cfg, plan, bits, group_size)
        report.experts = _experts_summary(plan, layout)
        tmp = _sibling(dst, "partial")
        created = _make_parents(dst.parent)
        tmp.mkdir()  # before the try: what exists already is not ours to remove
        try:
            _write_model(src, cfg, ckpt, plan, layout, ngram_bits, tmp, report, console)
            _move_into_place(tmp, dst, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for directory in created:  # deepest first: each is empty once tmp is gone
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # after --force: the model it replaced
    report.seconds = time.perf_counter() - started
    return report


def _write_model(src: Path, cfg: ModelArgs, ckpt: Checkpoint, plan: _Plan, layout: RecordLayout, ngram_bits: int,
                 out_dir: Path, report: ConversionReport, console: Console) -> None:
    """Write the whole packed model into out_dir, the manifest last (a directory without one is no model)."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("converting", total=plan.bytes_total)
        dense_dtype = _write_dense(cfg, ckpt, plan, out_dir, report, lambda n: progress.advance(task, n))
        files = _write_experts(cfg, ckpt, plan, layout, out_dir, report, lambda n: progress.advance(task, n))
        ngrams = _write_ngrams(cfg, ckpt, plan, ngram_bits, out_dir, report, lambda n: progress.advance(task, n))
    for name in COPIED_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out_dir / name)
    Manifest(layout, tuple(files), DENSE_FILE, dense_dtype, str(src), tuple(ngrams)).save(out_dir)


def _check_apart(src: Path, dst: Path) -> None:
    """Refuse a destination that is, holds or lies inside the source (symbolic links resolved): writing
    there, or replacing it, would destroy the checkpoint being read."""
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:
        where = "is" if target == source else "lies inside" if source in target.parents else "contains"
        raise ConversionError(f"{dst} {where} the source checkpoint {src}: write the packed model to a directory outside it")


def _check_destination(dst: Path, force: bool) -> None:
    """A destination must not exist, or with --force be a flashmoe model directory holding nothing but what
    a conversion writes: that, and only that, can be replaced without losing anything of the user's."""
    if not os.path.lexists(dst):
        return
    if not force:
        raise ConversionError(f"{dst} already exists; choose another output directory or pass --force to replace it")
    refuse = "--force replaces only a flashmoe model directory"
    if dst.is_symlink():
        raise ConversionError(
            f"{refuse}, and {dst} is a symbolic link (to {os.readlink(dst)}): pass the directory it points to, or remove the link"
        )
    if not dst.is_dir():
        raise ConversionError(f"{refuse}, and {dst} is a file: choose another output path")
    try:
        manifest = Manifest.load(dst)
    except PackedFormatError as e:
        what = f"its {MANIFEST_FILE} is not valid ({e})" if (dst / MANIFEST_FILE).exists() else _contents(dst)
        raise ConversionError(f"{refuse}, and {dst} is not one: {what}. Choose another output directory") from None
    foreign = _foreign_files(dst, manifest)
    if foreign:
        raise ConversionError(
            f"{refuse}, and {dst} also holds files that flashmoe convert did not write ({_first(foreign)}): "
            "move them out, or choose another output directory"
        )


def _contents(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return f"it holds {_first(names)}" if names else "it is an empty directory (remove it with rmdir)"


def _first(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _foreign_files(model_dir: Path, manifest: Manifest) -> list[str]:
    """Files (and links) under a model directory that no conversion writes: the user's own."""
    ours = {MANIFEST_FILE, *COPIED_FILES, manifest.dense_file, *(f.file for f in manifest.expert_files),
            *(f.file for f in manifest.ngram_files)}
    ours = {Path(name).as_posix() for name in ours}  # "experts/./x" and "experts/x" are one file
    foreign = []
    for root, dirs, files in os.walk(model_dir):  # links to directories are listed, never followed
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            relative = Path(root, name).relative_to(model_dir).as_posix()
            if relative not in ours:
                foreign.append(relative)
    return sorted(foreign)


def _check_tokenizer(src: Path, dst: Path, cfg: ModelArgs) -> list[str]:
    """Refuse a tokenizer with more tokens than the model has embeddings; without one, the warning to show."""
    if not (src / "tokenizer.json").is_file():
        return [
            f"{src} has no tokenizer.json, so the model in {dst} cannot generate text until tokenizer.json (and "
            "tokenizer_config.json and chat_template.jinja, where the model has them) is copied in from the original checkpoint"
        ]
    cfg.check_tokenizer(Tokenizer.from_dir(src).vocab_size, src / "tokenizer.json")
    return []


def _layout(cfg: ModelArgs, plan: _Plan, bits: int | None, group_size: int) -> RecordLayout:
    """The records: quantized experts kept as they are stored where --bits is not given (MXFP4 as
    released; MLX's affine groups repacked bit for bit), else stored at --bits (default 4)."""
    H, I, biased = cfg.hidden_size, cfg.moe.intermediate, cfg.moe.expert_bias
    if bits is None and plan.mxfp4:
        return RecordLayout.build(H, I, 4, quant.MXFP4_GROUP, with_bias=biased, scheme="mxfp4")
    if bits is None and plan.mlx_experts is not None:
        mlx_bits, mlx_group = plan.mlx_experts
        try:
            check_quantization(mlx_bits, mlx_group)
            return RecordLayout.build(H, I, mlx_bits, mlx_group, with_bias=biased)
        except ValueError as e:
            raise ConversionError(f"the MLX experts' {mlx_bits}-bit groups of {mlx_group} cannot be kept as records ({e}); "
                                  "pass --bits 4 (or 8) to requantize them from their dequantized weights") from None
    return RecordLayout.build(H, I, 4 if bits is None else bits, group_size, with_bias=biased)


def _experts_summary(plan: _Plan, layout: RecordLayout) -> str:
    """What the convert summary says became of the experts: kept as stored, or converted from what."""
    if layout.scheme == "mxfp4":
        return "MXFP4, kept as released"
    source = ("MXFP4" if plan.mxfp4 else f"MLX {plan.mlx_experts[0]}-bit" if plan.mlx_experts else
              "FP8" if plan.fp8 else None)
    if source and plan.mlx_experts == (layout.bits, layout.group_size):
        return f"{source} groups of {layout.group_size}, repacked bit for bit"
    return f"{source} dequantized, then stored {layout.bits}-bit" if source else f"stored {layout.bits}-bit"


def _plan(cfg: ModelArgs, ckpt: Checkpoint, mlx: MlxQuantization | None = None, fp8: tuple[int, int] | None = None) -> _Plan:
    naming = names(cfg)
    dense, experts, total = [], defaultdict(lambda: {"fused": {}, "split": {}}), 0
    ngrams = defaultdict(dict)
    for name in ckpt.names():
        canon = naming.canonical(name, cfg.num_hidden_layers)
        if canon is None:
            continue
        if shard := NGRAM_SHARD.fullmatch(canon):  # the n-gram tables get files of their own
            ngrams[int(shard[1])][int(shard[2])] = name
            total += ckpt.info(name).nbytes
            continue
        parsed = naming.expert(canon)
        if canon == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the head anyway; the embedding is the head
        if parsed is None and (_is_mlx_companion(ckpt, name, mlx) or _is_fp8_scale(ckpt, name)):
            continue  # read with its weight (and counted there: progress advances by the weights' bytes)
        total += ckpt.info(name).nbytes
        if parsed is None:
            dense.append(name)
            continue
        layer, expert, proj = parsed
        if expert is None:
            experts[layer]["fused"][proj] = name
        else:
            experts[layer]["split"][(expert, proj)] = name
    mxfp4 = any(proj.endswith(".blocks") for found in experts.values() for proj in found["fused"])
    mlx_experts = _mlx_experts(ckpt, experts, mlx)
    plan = _Plan(dense, dict(experts), total, mxfp4, mlx, mlx_experts, fp8, dict(ngrams))
    _check_ngrams(cfg, ckpt, plan)
    _check_fp8(ckpt, plan)
    _check_dense(cfg, ckpt, plan)
    _check_experts(cfg, ckpt, experts, mxfp4, mlx_experts)
    return plan


def _ngram_tables(cfg: ModelArgs) -> dict[int, tuple[list[int], int]]:
    """Layer -> (rows of each block the checkpoint stores its n-gram table in, row width)."""
    specs = {i: cfg.layer(i).ple for i in range(cfg.num_hidden_layers)}
    return {i: (shard_rows(spec), spec.width) for i, spec in specs.items() if spec is not None}


def _check_ngrams(cfg: ModelArgs, ckpt: Checkpoint, plan: _Plan) -> None:
    """Every layer with n-gram embeddings needs its table's blocks shard_0.. in the checkpoint, each of
    the shape config.json gives; no other layer may have any."""
    expected = _ngram_tables(cfg)
    if extra := sorted(set(plan.ngrams) - set(expected)):
        raise ConversionError(f"the checkpoint holds n-gram tables for layer {extra[0]}, but config.json's ple_layer_ids "
                              f"do not name layer {extra[0] + 1}: is config.json the one that belongs to these weights?")
    for layer, (rows, width) in expected.items():
        found = plan.ngrams.get(layer, {})
        for i, n in enumerate(rows):
            name = found.get(i, f"model.layers.{layer}.ple.ple_embedding.ngram_embedding.shard_{i}.weight")
            if i not in found:
                raise ConversionError(f"{name} is missing (layer {layer}'s n-gram table is stored in {len(rows)} blocks): "
                                      "is the download complete?")
            if (shape := tuple(ckpt.info(name).shape)) != (n, width):
                raise ConversionError(f"{name} has shape {list(shape)}; config.json implies {[n, width]}")
        if len(found) > len(rows):
            raise ConversionError(f"layer {layer}'s n-gram table is stored in {len(found)} blocks, config.json's "
                                  f"split_ngram_parts gives {len(rows)}: is config.json the one that belongs to these weights?")


def _is_fp8_scale(ckpt: Checkpoint, name: str) -> bool:
    """Whether `name` is the block scales of an FP8 weight (read together with it)."""
    weight = name.removesuffix(FP8_SCALE_SUFFIX)
    return name.endswith(FP8_SCALE_SUFFIX) and weight in ckpt.where and ckpt.info(weight).dtype == torch.float8_e4m3fn


def _check_fp8(ckpt: Checkpoint, plan: _Plan) -> None:
    """Every FP8 tensor must come with its block scales, in a checkpoint that says it is FP8, and
    not as fused experts (which no release stores)."""
    fused = [n for e in plan.experts.values() for n in e["fused"].values()]
    split = [n for e in plan.experts.values() for n in e["split"].values()]
    for name in plan.dense + split + fused:
        if ckpt.info(name).dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            continue
        if plan.fp8 is None or ckpt.info(name).dtype != torch.float8_e4m3fn:
            raise ConversionError(f"{name} is {ckpt.info(name).dtype}, but config.json declares no block-FP8 (e4m3) "
                                  "quantization_config: restore the config.json that came with these weights")
        if name + FP8_SCALE_SUFFIX not in ckpt.where:
            raise ConversionError(f"{name} is FP8 but {name}{FP8_SCALE_SUFFIX} is missing: is the download complete?")
        if name in fused:
            raise ConversionError(f"{name}: fused FP8 experts are not supported; convert the 16-bit checkpoint")


def _read_weight(ckpt: Checkpoint, name: str, plan: _Plan) -> torch.Tensor:
    """A tensor as its 16-bit or fp32 values: FP8 and MLX-packed weights dequantized with the scales
    (and biases) stored beside them."""
    t = ckpt.read(name)
    if (packed := _mlx_bits(ckpt, name, plan.mlx)) is not None:
        module = name.removesuffix(".weight")
        return mlx_dequantize(t, ckpt.read(module + ".scales"), ckpt.read(module + ".biases"), *packed, name)
    if t.dtype == torch.float8_e4m3fn and plan.fp8 is not None:
        return fp8_dequantize(t, ckpt.read(name + FP8_SCALE_SUFFIX), plan.fp8, name)
    return t


def _is_mlx_companion(ckpt: Checkpoint, name: str, mlx: MlxQuantization | None) -> bool:
    """Whether `name` is the scales or biases of an MLX-quantized weight (read together with it)."""
    base, dot, kind = name.rpartition(".")
    return mlx is not None and kind in ("scales", "biases") and _mlx_bits(ckpt, base + ".weight", mlx) is not None


def _mlx_bits(ckpt: Checkpoint, name: str, mlx: MlxQuantization | None) -> tuple[int, int] | None:
    """(bits, group size) of an MLX-quantized weight: packed uint32 codes with scales beside them; else None."""
    if mlx is None or not name.endswith(".weight") or name not in ckpt.where:
        return None
    module = name.removesuffix(".weight")
    if ckpt.info(name).dtype not in (torch.uint32, torch.int32) or module + ".scales" not in ckpt.where:
        return None
    found = mlx.of(module)
    if found is None:
        raise ConversionError(f"{name} holds packed codes, but config.json's quantization says {module} is not quantized")
    return found


def _mlx_experts(ckpt: Checkpoint, experts: dict, mlx: MlxQuantization | None) -> tuple[int, int] | None:
    """(bits, group size) shared by every MLX-quantized expert projection; None without them."""
    found = {_mlx_bits(ckpt, name, mlx): name for e in experts.values() for proj, name in e["fused"].items()}
    found.pop(None, None)
    if len(found) > 1:
        (a, first), (b, second) = list(found.items())[:2]
        raise ConversionError(f"the experts are quantized differently ({first}: {a[0]}-bit groups of {a[1]}; {second}: "
                              f"{b[0]}-bit groups of {b[1]}): records hold one layout; pass --bits to requantize them all")
    return next(iter(found), None)


def _sanitized_meta(cfg: ModelArgs, ckpt: Checkpoint, plan: _Plan) -> list[tuple[str, torch.dtype, tuple]]:
    """The dense tensors the packed file will hold, computed on shapes alone (meta tensors)."""
    naming, out = names(cfg), []
    for name in plan.dense:
        info = ckpt.info(name)
        shape, dtype = info.shape, info.dtype
        if (packed := _mlx_bits(ckpt, name, plan.mlx)) is not None:  # dequantized: [..., out, in]
            shape, dtype = (*shape[:-1], shape[-1] * 32 // packed[0]), torch.bfloat16
        elif dtype == torch.float8_e4m3fn:  # dequantized
            dtype = torch.bfloat16
        meta = torch.empty(shape, dtype=dtype, device="meta")
        for new_name, t in sanitize(cfg, naming.canonical(name, cfg.num_hidden_layers), meta):
            out.append((new_name, t.dtype, tuple(t.shape)))
    return out


def _check_dense(cfg: ModelArgs, ckpt: Checkpoint, plan: _Plan) -> None:
    with torch.device("meta"):
        model = Model(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {name: shape for name, _, shape in _sanitized_meta(cfg, ckpt, plan)}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        raise ConversionError(
            f"the checkpoint does not match its config.json ({cfg.model_type}): {'; '.join(parts)}. "
            "Is the download complete, and is config.json the one that belongs to these weights?"
        )
    for name, shape in have.items():
        if shape != want[name]:
            raise ConversionError(f"tensor {name} has shape {list(shape)}; config.json implies {list(want[name])}")


def _check_experts(cfg: ModelArgs, ckpt: Checkpoint, experts: dict, mxfp4: bool, mlx: tuple[int, int] | None) -> None:
    E, I, H = cfg.moe.num_experts, cfg.moe.intermediate, cfg.hidden_size
    if sorted(experts) != cfg.moe_layers:
        raise ConversionError(f"expert tensors found for layers {sorted(experts)}; config.json expects {cfg.moe_layers}")
    split_shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    fused_shapes = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
    if names(cfg).fused_in_out:
        fused_shapes = {"gate_up_proj": (E, H, 2 * I), "down_proj": (E, I, H)}
    if any("switch_mlp" in name for found in experts.values() for name in found["fused"].values()):
        fused_shapes = _switch_mlp_shapes(E, I, H, mlx)  # mlx-lm's, per projection
    if mxfp4:  # [E, out, groups, 16 bytes] and a scale per group, whatever the 16-bit tensors' order
        g = quant.MXFP4_GROUP
        if H % g or I % g:
            raise ConversionError(f"MXFP4 experts need hidden_size and intermediate_size that are multiples of {g}, not {H} and {I}")
        fused_shapes = {"gate_up_proj.blocks": (E, 2 * I, H // g, g // 2), "gate_up_proj.scales": (E, 2 * I, H // g),
                        "down_proj.blocks": (E, H, I // g, g // 2), "down_proj.scales": (E, H, I // g)}
    if cfg.moe.expert_bias:  # only fused layouts carry biases (gpt-oss's)
        fused_shapes |= {"gate_up_proj.bias": (E, 2 * I), "down_proj.bias": (E, H)}
        split_shapes = {}
    for layer, found in experts.items():
        fused, split = found["fused"], found["split"]
        if fused and sorted(fused) == sorted(fused_shapes):
            for proj, name in fused.items():
                if ckpt.info(name).shape != fused_shapes[proj]:
                    raise ConversionError(f"{name} has shape {list(ckpt.info(name).shape)}, expected {list(fused_shapes[proj])}"
                                          + (" (MXFP4 blocks and scales must agree with each other and config.json)" if mxfp4 else ""))
                if mxfp4 and proj.endswith((".blocks", ".scales")) and ckpt.info(name).dtype != torch.uint8:
                    raise ConversionError(f"{name} is {ckpt.info(name).dtype}, but MXFP4 blocks and scales are bytes (uint8)")
            continue
        missing = [(e, p) for e in range(E) for p in split_shapes if (e, p) not in split]
        if missing or fused or not split_shapes:
            expected = ", ".join(f"mlp.experts.{p.replace('.', '_')}" for p in fused_shapes)
            per_expert = f", or per-expert gate/up/down_proj for all {E} experts" if split_shapes else ""
            raise ConversionError(
                f"layer {layer}: incomplete experts (expected {expected}{per_expert}; "
                f"first missing: {_first_missing(fused_shapes, fused, missing)})"
            )
        for (e, proj), name in split.items():
            if ckpt.info(name).shape != split_shapes[proj]:
                raise ConversionError(f"{name} has shape {list(ckpt.info(name).shape)}, expected {list(split_shapes[proj])}")


def _switch_mlp_shapes(E: int, I: int, H: int, mlx: tuple[int, int] | None) -> dict[str, tuple]:
    """mlx-lm's stacked experts: gate, up [E, I, H] and down [E, H, I], or their packed codes,
    scales and biases."""
    shapes = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
    if mlx is None:
        return {f"{p}.weight": shape for p, shape in shapes.items()}
    bits, group = mlx
    out = {}
    for p, (e, n, k) in shapes.items():
        if k * bits % 32 or k % group:
            raise ConversionError(f"the experts' {p} input of {k} does not split into {bits}-bit words and groups of {group}")
        out |= {f"{p}.weight": (e, n, k * bits // 32), f"{p}.scales": (e, n, k // group), f"{p}.biases": (e, n, k // group)}
    return out


def _first_missing(fused_shapes: dict, fused: dict, missing: list) -> str:
    if fused:
        return next(p.replace(".", "_") for p in fused_shapes if p not in fused)
    return f"expert {missing[0][0]}" if missing else "every expert tensor"


def _dense_dtype(ckpt: Checkpoint, dense: list[str]) -> torch.dtype:
    """Dense weights stay 16-bit: the checkpoint's own 16-bit type, bfloat16 for wider sources."""
    dtypes = {ckpt.info(n).dtype for n in dense if ckpt.info(n).dtype.is_floating_point}
    return torch.float16 if dtypes == {torch.float16} else torch.bfloat16


def _stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dense file's dtype of a tensor: 16-bit, but for those the layers keep in fp32 (moe/block.py)."""
    return torch.float32 if name.rpartition(".")[2] in FP32_TENSORS else dtype


def _write_dense(cfg, ckpt, plan, out_dir: Path, report: ConversionReport, advance) -> str:
    naming, dtype = names(cfg), _dense_dtype(ckpt, plan.dense)
    entries = [(n, _stored_dtype(n, dtype), s) for n, _, s in _sanitized_meta(cfg, ckpt, plan)]
    writer = SafetensorsWriter(out_dir / DENSE_FILE, entries, {"format": "pt"})
    for name in plan.dense:
        source = _read_weight(ckpt, name, plan)
        for new_name, t in sanitize(cfg, naming.canonical(name, cfg.num_hidden_layers), source):
            stored = t.to(_stored_dtype(new_name, dtype))
            sums = report.error_sums["dense"]
            sums[0] += float((t.double() - stored.double()).pow(2).sum())
            sums[1] += float(t.double().pow(2).sum())
            writer.write(new_name, stored)
            report.dense_bytes += stored.numel() * stored.element_size()
        advance(ckpt.info(name).nbytes)
    writer.close()
    return str(dtype).removeprefix("torch.")


def _read_expert(ckpt: Checkpoint, plan: _Plan, layout: RecordLayout, found: dict, expert: int, naming: CheckpointNames
                 ) -> tuple[dict[str, torch.Tensor], int]:
    """({gate_up_proj: [2I, H], down_proj: [H, I], and biases where the experts have them}, source
    bytes) of one expert from any checkpoint layout, in the record's order (gate rows, then up).
    Quantized experts the layout keeps as stored come as their parts (MXFP4: {P.blocks, P.scales};
    MLX: {P.weight, P.scales, P.biases}); other quantized ones (FP8 too) dequantized."""
    if found["fused"]:
        tensors = {proj: ckpt.read_row(name, expert) for proj, name in found["fused"].items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if "gate_up_proj.blocks" in tensors:
            tensors = _mxfp4_expert(tensors, found["fused"], expert, keep=layout.scheme == "mxfp4")
        elif "gate_proj.weight" in tensors:
            keep = plan.mlx_experts == (layout.bits, layout.group_size)
            tensors = _switch_mlp_expert(tensors, found["fused"], plan.mlx_experts, keep)
        elif naming.fused_in_out:
            tensors["gate_up_proj"], tensors["down_proj"] = tensors["gate_up_proj"].t().contiguous(), tensors["down_proj"].t().contiguous()
        if naming.gate_up_interleaved:  # gate, up, gate, up, ... -> gate rows, then up rows
            for proj in ("gate_up_proj", "gate_up_proj.bias", "gate_up_proj.blocks", "gate_up_proj.scales"):
                if proj in tensors:
                    tensors[proj] = torch.cat([tensors[proj][0::2], tensors[proj][1::2]])
    else:
        names_of = {proj: found["split"][(expert, proj)] for proj in ("gate_proj", "up_proj", "down_proj")}
        read = {proj: _read_weight(ckpt, name, plan) for proj, name in names_of.items()}
        tensors = {"gate_up_proj": torch.cat([read["gate_proj"], read["up_proj"]]), "down_proj": read["down_proj"]}
        nbytes = sum(ckpt.info(name).nbytes for name in names_of.values())
    return tensors, nbytes


def _switch_mlp_expert(tensors: dict[str, torch.Tensor], source: dict[str, str], mlx: tuple[int, int] | None,
                       keep: bool) -> dict[str, torch.Tensor]:
    """One expert of mlx-lm's stacked projections: gate and up rows joined into gate_up; packed codes
    (`mlx`: their bits and group size) kept with their scales and biases (`keep`: bit for bit, so the
    scales must be exact in bfloat16), or dequantized; 16-bit ones as they are."""
    joined = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    if mlx is None:
        return {ours: torch.cat([tensors[f"{p}.weight"] for p in theirs]) for ours, theirs in joined.items()}
    bits, group = mlx
    out = {}
    for ours, theirs in joined.items():
        if not keep:
            out[ours] = torch.cat([mlx_dequantize(*(tensors[f"{p}.{k}"] for k in ("weight", "scales", "biases")), bits, group,
                                                  source[f"{p}.weight"]) for p in theirs])
            continue
        out[f"{ours}.weight"] = torch.cat([tensors[f"{p}.weight"] for p in theirs]).view(torch.int32)
        for kind in ("scales", "biases"):
            parts = [tensors[f"{p}.{kind}"] for p in theirs]
            for p, t in zip(theirs, parts):
                if not torch.equal(t.to(torch.bfloat16).to(t.dtype), t):
                    raise ConversionError(f"{source[p + '.' + kind]} holds {t.dtype} values that bfloat16 (the records' "
                                          "scales) cannot hold exactly: pass --bits 4 (or 8) to requantize the experts")
            out[f"{ours}.{kind}"] = torch.cat(parts).to(torch.bfloat16)
    return out


def _mxfp4_expert(tensors: dict[str, torch.Tensor], source: dict[str, str], expert: int, keep: bool) -> dict[str, torch.Tensor]:
    """One expert's MXFP4 rows ([N, K/32, 16] blocks -> [N, K/2] bytes), refusing NaN scales; with
    `keep` as they are, else dequantized to fp32 weights (exactly: FP4 times a power of two)."""
    out = {p: t for p, t in tensors.items() if p.endswith(".bias")}
    for proj in ("gate_up_proj", "down_proj"):
        blocks, scales = tensors[f"{proj}.blocks"], tensors[f"{proj}.scales"]
        if bool((scales == quant.E8M0_NAN).any()):
            raise ConversionError(f"{source[proj + '.scales']}: expert {expert} holds the scale byte 255, which E8M0 "
                                  "reserves for NaN; the checkpoint is damaged: download it again")
        blocks = blocks.reshape(blocks.shape[0], -1)
        if keep:
            out[f"{proj}.blocks"], out[f"{proj}.scales"] = blocks, scales
        else:
            out[proj] = quant.dequantize_mxfp4(blocks, scales)
    return out


def _encode_expert(layout: RecordLayout, weights: dict[str, torch.Tensor], report: ConversionReport) -> torch.Tensor:
    tensors = {}
    for proj, w in weights.items():
        if proj.endswith(".bias"):  # stored 16-bit, as the weights of a 16-bit record
            tensors[proj] = w.to(torch.bfloat16)
            continue
        if proj.endswith((".blocks", ".scales", ".weight", ".biases")):  # kept as stored (MXFP4, MLX): the bytes, unchanged
            tensors[proj] = w
            continue
        if layout.bits == 16:
            stored = w.to(torch.bfloat16)
            tensors[f"{proj}.weight"] = stored
            approx = stored
        else:
            codes, scales, biases = quant.quantize(w, layout.bits, layout.group_size)
            tensors.update({f"{proj}.weight": codes, f"{proj}.scales": scales, f"{proj}.biases": biases})
            approx = quant.dequantize(codes, scales, biases, layout.bits, layout.group_size)
        sums = report.error_sums[f"experts.{proj}"]
        wf = w.float()
        sums[0] += float((wf - approx.float()).pow(2).sum())
        sums[1] += float(wf.pow(2).sum())
    return layout.pack(tensors)


def _write_experts(cfg, ckpt, plan, layout: RecordLayout, out_dir: Path, report, advance) -> list[ExpertFile]:
    (out_dir / "experts").mkdir()
    files = []
    for layer in sorted(plan.experts):
        rel = f"experts/layer_{layer:03d}.bin"
        crcs = []
        with open(out_dir / rel, "wb") as f:
            for expert in range(cfg.moe.num_experts):
                tensors, nbytes = _read_expert(ckpt, plan, layout, plan.experts[layer], expert, names(cfg))
                record = _encode_expert(layout, tensors, report)
                data = record.numpy()
                crcs.append(zlib.crc32(data))
                f.write(data.data)
                report.expert_bytes += layout.record_size
                advance(nbytes)
        files.append(ExpertFile(layer, rel, cfg.moe.num_experts, tuple(crcs)))
    return files


def _write_ngrams(cfg: ModelArgs, ckpt: Checkpoint, plan: _Plan, bits: int, out_dir: Path, report: ConversionReport,
                  advance) -> list[NgramFile]:
    """Each n-gram table to ngrams/layer_NNN.bin (docs/FORMAT.md): its blocks' rows packed into
    page-sized blocks, then one CRC-32 per block. At 16 bits, 16-bit tables keep their values and
    wider ones become bfloat16; at 8, int8 codes with a scale per row."""
    if not plan.ngrams:
        return []
    (out_dir / "ngrams").mkdir()
    files = []
    for layer, (rows, width) in sorted(_ngram_tables(cfg).items()):
        names_in_order = [plan.ngrams[layer][i] for i in range(len(rows))]
        dtype = ckpt.info(names_in_order[0]).dtype
        dtype = "int8" if bits == 8 else str(dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
        table = NgramFile.for_layer(layer, sum(rows), width, dtype.removeprefix("torch."))
        with open(out_dir / table.file, "wb") as f:
            writer = NgramTableWriter(f, table)
            for name in names_in_order:
                source = _read_weight(ckpt, name, plan)
                stored = table.encode(source)
                sums = report.error_sums["ngrams"]
                sums[0] += float((source.double() - table.decode(stored).double()).pow(2).sum())
                sums[1] += float(source.double().pow(2).sum())
                writer.write(stored)
                advance(ckpt.info(name).nbytes)
            writer.close()
        report.ngram_bytes += table.file_size
        files.append(table)
    return files


def _sibling(dst: Path, role: str) -> Path:
    """This process's hidden working directory beside dst: .NAME.partial-PID (the model being written)
    or .NAME.old-PID (the replaced model, set aside where no atomic exchange exists)."""
    return dst.parent / f".{dst.name}.{role}-{os.getpid()}"


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; return those created, deepest first, to undo on failure."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _move_into_place(tmp: Path, dst: Path, force: bool) -> None:
    """Put the complete model `tmp` at dst. What is at dst now is checked again: a conversion takes long."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if not force:
        raise ConversionError(f"{dst} appeared while converting; choose another output directory or pass --force to replace it")
    _check_destination(dst, force)
    _swap(tmp, dst)


def _swap(new: Path, dst: Path) -> None:
    """Exchange the complete model `new` with the model at dst in one step: readers of dst see the old
    model or the new, never neither. The old model ends at `new`'s path, for the caller to remove."""
    if _rename_exchange(new, dst):
        return
    # No atomic exchange here (not Linux, or a filesystem such as NFS): two renames, undone if the second
    # fails. A kill between them leaves the old model at `aside`, which the next run puts back.
    aside = _sibling(dst, "old")
    os.rename(dst, aside)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    os.rename(aside, new)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(a, b, RENAME_EXCHANGE); False where the C library, kernel or filesystem lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _clean_up_dead_runs(dst: Path) -> None:
    """Undo what earlier, killed conversions to dst left beside it: partial directories are removed; a
    model set aside for --force goes back to dst if the kill came before the new one took its place."""
    for role in ("partial", "old"):
        for p in dst.parent.glob(f".{glob.escape(dst.name)}.{role}-*"):
            if not _left_by_dead_run(p):
                continue
            if role == "old" and not os.path.lexists(dst):
                os.rename(p, dst)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _left_by_dead_run(p: Path) -> bool:
    """Whether `p` is a working directory a conversion made (.NAME.ROLE-PID) whose process is gone."""
    pid = p.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or p.is_symlink() or not p.is_dir():
        return False  # not a name a conversion gives: someone else's
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process; no process id at all
        return False
    return False
