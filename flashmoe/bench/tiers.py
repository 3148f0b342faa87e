"""Where a benchmark's experts lie: tiers planned for the full model from the machine (GPU memory
less the dense weights and a margin, RAM less a reserve, the rest on disk) and scaled to the slice
by placing whole experts of each layer; the engine built over them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EngineConfig
from ..formats.packed import RecordLayout
from ..layers.int8_linear import is_int8_linear
from ..models import ModelArgs
from .synthesis import dense_tensors

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


def plan_tiers(full: ModelArgs, layout: RecordLayout, gpu_total: int, ram_total: int, gpu_mem=None, host_mem=None,
               dense_bits: int = 16) -> Tiers:
    """Tiers for the full model, as fractions of its experts, from the machine (or given budgets)."""
    n_moe, E = len(full.moe_layers), full.moe.num_experts
    all_experts = n_moe * E * layout.record_size
    dense = dense_bytes(full, dense_bits)
    gpu = gpu_mem if gpu_mem is not None else max(0, gpu_total - dense - GPU_MARGIN)
    host = host_mem if host_mem is not None else max(0, ram_total - RAM_RESERVE)
    per_layer = n_moe * layout.record_size  # bytes of one expert index across all layers
    g = min(E, gpu // per_layer)
    h = min(E - g, host // per_layer)
    notes = (
        f"full model: experts {all_experts / 2**30:.1f} GiB, dense {dense / 2**30:.1f} GiB ({dense_bits}-bit); "
        f"GPU tier = GPU {gpu_total / 2**30:.0f} GiB - dense - {GPU_MARGIN >> 30} GiB margin = {gpu / 2**30:.1f} GiB; "
        f"host tier = RAM {ram_total / 2**30:.0f} GiB - {RAM_RESERVE >> 30} GiB reserve = {host / 2**30:.1f} GiB"
    )
    return Tiers(g, h, E, g / E, h / E, 1 - (g + h) / E, notes)


def place_tiers(engine, tiers: Tiers, resident: bool = False, adaptive: bool = False) -> None:
    """GPU slots get experts [0, g) of each layer, the host tier [g, g + h); the rest stays on disk
    (Engine.place_experts). Resident: read every expert where it lies (needs no disk tier), and
    with `adaptive` swap experts between the tiers by use."""
    engine.set_resident(False)
    engine.place_experts(tiers.gpu_per_layer, tiers.host_per_layer)
    engine.set_resident(resident, adaptive)


def slice_engine(out: Path, args: ModelArgs, layout: RecordLayout, tiers: Tiers, k_max: int, dense_bits: int = 16,
                 prefetch: bool = False):
    """An engine over the synthesized slice with tier budgets for `tiers` (place_tiers fills them)."""
    from ..engine import Engine

    rs, moe_layers = layout.record_size, len(args.moe_layers)
    return Engine(out, EngineConfig(
        device="cuda", k=k_max, cache_policy="static", direct_io=True, verify=False,
        host_mem=(tiers.host_per_layer * moe_layers + k_max) * rs, gpu_mem=tiers.gpu_per_layer * moe_layers * rs,
        dense_bits=dense_bits, prefetch=prefetch,
    ))
