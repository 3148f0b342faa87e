"""Resident decode's expert lookup (experts/resident.py, ResidentTable.slots): the
slot of every routed expert from one layer's row of the device table, and one use counted for
each lookup in that layer's row of the counters (collect_stats reads them between tokens).

Eagerly that is a gather and an `index_add_`: two launches, ~6 us of each MoE layer in the H200's
resident decode step (docs/bench/2026-12-02/profile-resident-graphs-h200.txt); here one program
does both (a decode step routes at most DECODE_MAX_TOKENS x k ids). The counts are atomic adds:
the tokens of one call may share experts. `lookup_slots_reference` is the PyTorch definition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def lookup_counted(table_ptr, uses_ptr, e, live):
    """table[e] for the routed experts e where `live` (0 elsewhere), each lookup counted in uses.
    Also the first step of the CPU share's publish (kernels/host_handoff.py)."""
    tl.atomic_add(uses_ptr + e, 1, mask=live, sem="relaxed")  # counters only: no ordering needed
    return tl.load(table_ptr + e, mask=live, other=0)


@triton.jit
def _lookup_kernel(ids_ptr, table_ptr, uses_ptr, slots_ptr, N, K, ids_stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    live = i < N
    e = tl.load(ids_ptr + i // K * ids_stride + i % K, mask=live, other=0)
    tl.store(slots_ptr + i, lookup_counted(table_ptr, uses_ptr, e, live), mask=live)


def lookup_slots(table: torch.Tensor, uses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table [E] int64 (slot of each expert), uses [E] int64 (counters, updated in place), ids [T, k]
    int64 (unit column stride) -> slots [T, k] = table[ids], each lookup counted in uses; one launch."""
    T, k = ids.shape
    if table.ndim != 1 or uses.shape != table.shape or uses.dtype != torch.int64 or ids.stride(-1) != 1:
        raise ValueError(f"lookup_slots takes table, uses [E] (int64) and ids [T, k] with unit column stride, got "
                         f"{tuple(table.shape)}, {tuple(uses.shape)} {uses.dtype}, {tuple(ids.shape)}")
    slots = torch.empty(T, k, dtype=table.dtype, device=ids.device)
    _lookup_kernel[(1,)](ids, table, uses, slots, T * k, k, ids.stride(0), BLOCK=triton.next_power_of_2(T * k),
                         num_warps=1)
    return slots


def lookup_slots_reference(table: torch.Tensor, uses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The same in PyTorch (the two launches the kernel replaces)."""
    flat = ids.flatten()
    uses.index_add_(0, flat, torch.ones_like(flat))
    return table[ids]
