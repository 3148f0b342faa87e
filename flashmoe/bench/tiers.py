"""Where a benchmark's experts lie: tiers planned for the full model from the machine (GPU memory
less the dense weights and a margin, RAM less a reserve and the n-gram row cache, the rest on disk)
and scaled to the slice by placing whole experts of each layer; the engine built over them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EngineConfig, default_ngram_mem
from ..formats.packed import RecordLayout
from ..layers.int8_linear import is_int8_linear
from ..models import ModelArgs
from .synthesis import dense_tensors, ngram_table_files

GPU_MARGIN = 6 << 30  # KV/state, activations, staging slots, CUDA context (full model)
RAM_RESERVE = 24 << 30  # OS, the process, dense weights in flight


def dense_bytes(args: ModelArgs, dense_bits: int = 16) -> int:
    """Resident bytes of every non-expert weight of a model of this shape: as stored, or with
    dense_bits 8 the int8 projections at one byte per weight plus an fp32 scale per row."""
    total = 0
    for name, shape, dtype, _ in dense_tensors(args):
        module, _, kind = name.rpartition(".")
        if dense_bits == 8 and kind == "weight" and is_int8_linear(module):
            total += torch.Size(shape).numel() + 4 * shape[0]
        else:
            total += torch.Size(shape).numel() * dtype.itemsize
    return total


@dataclass
class Tiers:
    gpu_per_layer: int
    host_per_layer: int
    experts_per_layer: int
    gpu_fraction: float
    host_fraction: float
    disk_fraction: float
    notes: str
    ngram_table_bytes: int = 0  # the full model's n-gram tables as stored (on disk; qwen4_exp)
    ngram_cache_bytes: int = 0  # ... their row cache, taken from the host tier (default_ngram_mem)
    ngram_cache_share: float = 0.0  # ... the share of the tables' rows it holds, kept in the slice (slice_engine)


def plan_tiers(full: ModelArgs, layout: RecordLayout, gpu_total: int, ram_total: int, gpu_mem=None, host_mem=None,
               dense_bits: int = 16, ngram_bits: int = 16) -> Tiers:
    """Tiers for the full model, as fractions of its experts, from the machine (or given budgets).
    N-gram tables (qwen4_exp, rows of ngram_bits) stay on disk; their row cache takes the engine's
    default share of the host tier."""
    n_moe, E = len(full.moe_layers), full.moe.num_experts
    all_experts = n_moe * E * layout.record_size
    dense = dense_bytes(full, dense_bits)
    gpu = gpu_mem if gpu_mem is not None else max(0, gpu_total - dense - GPU_MARGIN)
    host = host_mem if host_mem is not None else max(0, ram_total - RAM_RESERVE)
    tables = ngram_table_files(full, ngram_bits)
    table_rows_bytes = sum(t.rows * t.row_bytes for t in tables)
    ngram_cache = default_ngram_mem(table_rows_bytes, host)  # the engine's rule, the host budget being the host tier
    per_layer = n_moe * layout.record_size  # bytes of one expert index across all layers
    g = min(E, gpu // per_layer)
    h = min(E - g, (host - ngram_cache) // per_layer)
    notes = (
        f"full model: experts {all_experts / 2**30:.1f} GiB, dense {dense / 2**30:.1f} GiB ({dense_bits}-bit); "
        f"GPU tier = GPU {gpu_total / 2**30:.0f} GiB - dense - {GPU_MARGIN >> 30} GiB margin = {gpu / 2**30:.1f} GiB; "
        f"host tier = RAM {ram_total / 2**30:.0f} GiB - {RAM_RESERVE >> 30} GiB reserve = {host / 2**30:.1f} GiB"
    )
    table_bytes, cache_share = sum(t.file_size for t in tables), ngram_cache / table_rows_bytes if tables else 0.0
    if tables:
        notes += (f"; n-gram tables {table_bytes / 2**30:.1f} GiB on disk, their row cache {ngram_cache / 2**30:.1f} GiB "
                  f"of the host tier ({cache_share:.1%} of their rows), experts the rest")
    return Tiers(g, h, E, g / E, h / E, 1 - (g + h) / E, notes, table_bytes, ngram_cache, cache_share)


def place_tiers(engine, tiers: Tiers, resident: bool = False, adaptive: bool = False) -> None:
    """GPU slots get experts [0, g) of each layer, the host tier [g, g + h); the rest stays on disk
    (Engine.place_experts). Resident: read every expert where it lies (needs no disk tier), and
    with `adaptive` swap experts between the tiers by use."""
    engine.set_resident(False)
    engine.place_experts(tiers.gpu_per_layer, tiers.host_per_layer)
    engine.set_resident(resident, adaptive)


def slice_engine(out: Path, args: ModelArgs, layout: RecordLayout, tiers: Tiers, k_max: int, dense_bits: int = 16,
                 prefetch: bool = False, ngram_bits: int = 16):
    """An engine over the synthesized slice with tier budgets for `tiers` (place_tiers fills them),
    and a row cache holding the share of the slice's n-gram tables the full model's would (taken
    from the host budget by the engine, so added to it)."""
    from ..engine import Engine

    rs, moe_layers = layout.record_size, len(args.moe_layers)
    tables = ngram_table_files(args, ngram_bits)
    ngram_mem = int(tiers.ngram_cache_share * sum(t.rows * t.row_bytes for t in tables)) if tables else None
    return Engine(out, EngineConfig(
        device="cuda", k=k_max, cache_policy="static", direct_io=True, verify=False,
        host_mem=(tiers.host_per_layer * moe_layers + k_max) * rs + (ngram_mem or 0),
        ngram_mem=ngram_mem, gpu_mem=tiers.gpu_per_layer * moe_layers * rs, dense_bits=dense_bits, prefetch=prefetch,
        preload=False,  # the scenarios place the experts themselves (place_tiers)
        placement_heat=False,  # ... from the same first placement every run, whatever an earlier one learned
    ))
