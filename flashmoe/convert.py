"""`flashmoe convert`: a Hugging Face checkpoint -> the packed format (docs/FORMAT.md), once.

Tensors are read one at a time (experts one expert at a time, even from fused [E, ...] tensors),
so memory stays a small multiple of the largest single tensor. Everything is written into a
hidden temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

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
from .formats.packed import DENSE_FILE, ExpertFile, Manifest, RecordLayout
from .formats.safetensors import Checkpoint, SafetensorsWriter
from .models import ModelArgs, names, read_args, sanitize
from .models.transformer import Model
from .moe.block import FP32_TENSORS

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
    # per tensor kind: [sum of squared error, sum of squared weights]
    error_sums: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))

    def relative_errors(self) -> dict[str, float]:
        return {k: (e / max(w, 1e-30)) ** 0.5 for k, (e, w) in self.error_sums.items()}


@dataclass
class _Plan:
    dense: list[str]  # checkpoint names of dense tensors, in write order
    experts: dict[int, dict]  # layer -> {"fused": {proj: name}} or {"split": {(expert, proj): name}}
    bytes_total: int


def convert(
    src: str | Path,
    dst: str | Path,
    bits: int = 4,
    group_size: int = 64,
    force: bool = False,
    console: Console | None = None,
) -> ConversionReport:
    src, dst = Path(src), Path(dst)
    console = console or Console(stderr=True)
    if bits not in (16, *quant.QUANT_BITS):
        raise ConversionError(f"--bits must be 16, 8, 4 or 2, not {bits}")
    cfg = read_args(src)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists; choose another output directory or pass --force to replace it")
    layout = RecordLayout.build(cfg.hidden_size, cfg.moe.intermediate, bits, group_size)
    started = time.perf_counter()
    with Checkpoint(src) as ckpt:
        plan = _plan(cfg, ckpt)
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        _remove_stale_partials(dst)
        tmp.mkdir(parents=True)
        try:
            report = ConversionReport(dst)
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
                dense_dtype = _write_dense(cfg, ckpt, plan, tmp, report, lambda n: progress.advance(task, n))
                files = _write_experts(cfg, ckpt, plan, layout, tmp, report, lambda n: progress.advance(task, n))
            for name in COPIED_FILES:
                if (src / name).exists():
                    shutil.copy2(src / name, tmp / name)
            Manifest(layout, tuple(files), DENSE_FILE, dense_dtype, str(src)).save(tmp)
            if dst.exists():  # --force: swap in the new directory, then drop the old one
                old = dst.parent / f".{dst.name}.old-{os.getpid()}"
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old)
            else:
                os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report.seconds = time.perf_counter() - started
    return report


def _plan(cfg: ModelArgs, ckpt: Checkpoint) -> _Plan:
    naming = names(cfg)
    dense, experts, total = [], defaultdict(lambda: {"fused": {}, "split": {}}), 0
    for name in ckpt.names():
        canon = naming.canonical(name, cfg.num_hidden_layers)
        if canon is None:
            continue
        parsed = naming.expert(canon)
        if canon == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the head anyway; the embedding is the head
        total += ckpt.info(name).nbytes
        if parsed is None:
            dense.append(name)
            continue
        layer, expert, proj = parsed
        if expert is None:
            experts[layer]["fused"][proj] = name
        else:
            experts[layer]["split"][(expert, proj)] = name
    _check_dense(cfg, ckpt, dense)
    _check_experts(cfg, ckpt, experts)
    return _Plan(dense, dict(experts), total)


def _sanitized_meta(cfg: ModelArgs, ckpt: Checkpoint, dense: list[str]) -> list[tuple[str, torch.dtype, tuple]]:
    """The dense tensors the packed file will hold, computed on shapes alone (meta tensors)."""
    naming, out = names(cfg), []
    for name in dense:
        info = ckpt.info(name)
        meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
        for new_name, t in sanitize(cfg, naming.canonical(name, cfg.num_hidden_layers), meta):
            out.append((new_name, t.dtype, tuple(t.shape)))
    return out


def _check_dense(cfg: ModelArgs, ckpt: Checkpoint, dense: list[str]) -> None:
    with torch.device("meta"):
        model = Model(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {name: shape for name, _, shape in _sanitized_meta(cfg, ckpt, dense)}
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


def _check_experts(cfg: ModelArgs, ckpt: Checkpoint, experts: dict) -> None:
    E, I, H = cfg.moe.num_experts, cfg.moe.intermediate, cfg.hidden_size
    if sorted(experts) != cfg.moe_layers:
        raise ConversionError(f"expert tensors found for layers {sorted(experts)}; config.json expects {cfg.moe_layers}")
    split_shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    fused_shapes = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
    for layer, found in experts.items():
        fused, split = found["fused"], found["split"]
        if fused and sorted(fused) == sorted(fused_shapes):
            for proj, name in fused.items():
                if ckpt.info(name).shape != fused_shapes[proj]:
                    raise ConversionError(f"{name} has shape {list(ckpt.info(name).shape)}, expected {list(fused_shapes[proj])}")
            continue
        missing = [(e, p) for e in range(E) for p in split_shapes if (e, p) not in split]
        if missing or fused:
            raise ConversionError(
                f"layer {layer}: incomplete experts (expected mlp.experts.gate_up_proj/down_proj, or per-expert "
                f"gate/up/down_proj for all {E} experts; first missing: expert {missing[0][0] if missing else '?'})"
            )
        for (e, proj), name in split.items():
            if ckpt.info(name).shape != split_shapes[proj]:
                raise ConversionError(f"{name} has shape {list(ckpt.info(name).shape)}, expected {list(split_shapes[proj])}")


def _dense_dtype(ckpt: Checkpoint, dense: list[str]) -> torch.dtype:
    """Dense weights stay 16-bit: the checkpoint's own 16-bit type, bfloat16 for wider sources."""
    dtypes = {ckpt.info(n).dtype for n in dense if ckpt.info(n).dtype.is_floating_point}
    return torch.float16 if dtypes == {torch.float16} else torch.bfloat16


def _stored_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dense file's dtype of a tensor: 16-bit, but for those the layers keep in fp32 (moe/block.py)."""
    return torch.float32 if name.rpartition(".")[2] in FP32_TENSORS else dtype


def _write_dense(cfg, ckpt, plan, out_dir: Path, report: ConversionReport, advance) -> str:
    naming, dtype = names(cfg), _dense_dtype(ckpt, plan.dense)
    entries = [(n, _stored_dtype(n, dtype), s) for n, _, s in _sanitized_meta(cfg, ckpt, plan.dense)]
    writer = SafetensorsWriter(out_dir / DENSE_FILE, entries, {"format": "pt"})
    for name in plan.dense:
        source = ckpt.read(name)
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


def _read_expert(ckpt: Checkpoint, found: dict, expert: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gate_up [2I, H], down [H, I], source bytes) of one expert from either checkpoint layout."""
    if found["fused"]:
        gate_up = ckpt.read_row(found["fused"]["gate_up_proj"], expert)
        down = ckpt.read_row(found["fused"]["down_proj"], expert)
    else:
        split = found["split"]
        gate_up = torch.cat([ckpt.read(split[(expert, "gate_proj")]), ckpt.read(split[(expert, "up_proj")])])
        down = ckpt.read(split[(expert, "down_proj")])
    return gate_up, down, (gate_up.numel() + down.numel()) * gate_up.element_size()


def _encode_expert(layout: RecordLayout, weights: dict[str, torch.Tensor], report: ConversionReport) -> torch.Tensor:
    tensors = {}
    for proj, w in weights.items():
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
                gate_up, down, nbytes = _read_expert(ckpt, plan.experts[layer], expert)
                record = _encode_expert(layout, {"gate_up_proj": gate_up, "down_proj": down}, report)
                data = record.numpy()
                crcs.append(zlib.crc32(data))
                f.write(data.data)
                report.expert_bytes += layout.record_size
                advance(nbytes)
        files.append(ExpertFile(layer, rel, cfg.moe.num_experts, tuple(crcs)))
    return files


def _remove_stale_partials(dst: Path) -> None:
    """Remove temporary directories that earlier, killed conversions to `dst` left behind."""
    for p in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass
