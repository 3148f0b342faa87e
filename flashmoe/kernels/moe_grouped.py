"""Grouped experts for prefill: every expert of a batch multiplied with all of its tokens, weights
dequantized tile by tile inside the matrix-multiply loop, in two launches for the whole batch:

  gate_up: h [M, I] = silu(x_e . gate_e^T) * (x_e . up_e^T)   for each expert e's rows of x
  down:    y [M, H] = h_e . down_e^T

Tokens arrive sorted by expert (x_sorted [M, H], expert e owning rows [start_e, start_e + count_e)),
so each expert's weights are read once per tile of BLOCK_M of its tokens, and the Python loop over
experts (and its launches) disappears. Reference: `moe_grouped_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu, swiglu_expert
from . import INTERPRETED
from .moe_gemv import out_bias, expert_act, record_bases


@triton.jit
def _weight_tile(codes_ptr, halves_ptr, w_base, s_base, b_base, rows, k0, K,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DTYPE: tl.constexpr):
    """W[rows, k0:k0+BLOCK_K] of one expert's [N, K] projection as [BLOCK_N, BLOCK_K] in DTYPE."""
    if BITS == 16:
        cols = k0 + tl.arange(0, BLOCK_K)
        return tl.load(halves_ptr + w_base + rows[:, None] * K + cols[None, :]).to(DTYPE)
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    wcols = k0 // PER_WORD + tl.arange(0, WORDS)
    words = tl.load(codes_ptr + w_base + rows[:, None] * (K // PER_WORD) + wcols[None, :])
    q = (words[:, :, None] >> (tl.arange(0, PER_WORD) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)
    gcols = k0 // GROUP + tl.arange(0, GROUPS)
    goff = rows[:, None] * (K // GROUP) + gcols[None, :]
    s = tl.load(halves_ptr + s_base + goff).to(tl.float32)
    b = tl.load(halves_ptr + b_base + goff).to(tl.float32)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GROUPS, GROUP)), (BLOCK_N, BLOCK_K))
    b = tl.reshape(tl.broadcast_to(b[:, :, None], (BLOCK_N, GROUPS, GROUP)), (BLOCK_N, BLOCK_K))
    return (q * s + b).to(DTYPE)


@triton.jit
def _grouped_kernel(
    x_ptr, codes_ptr, halves_ptr, tile_slot_ptr, tile_row_ptr, tile_end_ptr, out_ptr,
    K, N, record_words, record_halves, w_off, s_off, b_off, up_rows, bias_off, limit, alpha,
    SWIGLU: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = rows_m < end
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base, s_base, b_base = record_bases(slot, record_words, record_halves, w_off, s_off, b_off, BITS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows_m[:, None] * K + cols[None, :], mask=mask_m[:, None], other=0.0).to(DTYPE)
        w = _weight_tile(codes_ptr, halves_ptr, w_base, s_base, b_base, rows_n, k0, K,
                         BITS, GROUP, BLOCK_N, BLOCK_K, DTYPE)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        if SWIGLU:  # the up rows sit I rows below the gate rows of gate_up_proj
            w_up = _weight_tile(codes_ptr, halves_ptr, w_base, s_base, b_base, rows_n + up_rows, k0, K,
                                BITS, GROUP, BLOCK_N, BLOCK_K, DTYPE)
            acc_up = tl.dot(a, tl.trans(w_up), acc_up, input_precision=PRECISION)
    if HAS_BIAS:  # the experts' output biases (gpt-oss)
        acc += out_bias(halves_ptr, slot, record_halves, bias_off, rows_n)[None, :]
        if SWIGLU:
            acc_up += out_bias(halves_ptr, slot, record_halves, bias_off, rows_n + up_rows)[None, :]
    if SWIGLU:
        acc = expert_act(acc, acc_up, limit, alpha, CLAMPED)
    tl.store(out_ptr + rows_m[:, None] * N + rows_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


def expert_tiles(slots: list[int], counts: list[int], block_m: int, device) -> tuple[torch.Tensor, ...]:
    """The grouped kernels' work list: one tile per block_m rows of each expert (rows sorted by
    expert, expert i's `counts[i]` rows in pool slot `slots[i]`) -> (slot, first row, end row)."""
    tile_slot, tile_row, tile_end, start = [], [], [], 0
    for slot, count in zip(slots, counts):
        for row in range(start, start + count, block_m):
            tile_slot.append(slot)
            tile_row.append(row)
            tile_end.append(start + count)
        start += count
    # Slots are int64: a resident tier's slot numbers also address pinned host records (experts/tier.py).
    return tuple(torch.tensor(t, dtype=d).to(device, non_blocking=True)
                 for t, d in ((tile_slot, torch.int64), (tile_row, torch.int32), (tile_end, torch.int32)))


class MoeGrouped:
    """Launch parameters for one record layout."""

    def __init__(self, layout: RecordLayout, block_m: int = 64, block_n: int = 64, block_k: int = 64,
                 num_warps: int = 4, num_stages: int = 3, act: Swiglu = SILU):
        self.layout, self.act = layout, act
        H, I = layout.hidden_size, layout.intermediate_size
        self.block_m, self.block_n, self.block_k = block_m, min(block_n, H, I), min(block_k, H, I)
        if H % self.block_n or I % self.block_n or H % self.block_k or I % self.block_k:
            raise ValueError(f"the grouped expert kernel needs hidden {H} and intermediate {I} to be multiples of "
                             f"{max(self.block_n, self.block_k)}")
        self.num_warps, self.num_stages = num_warps, num_stages
        seg = {s.name: s for s in layout.segments}
        unit = 2 if layout.bits == 16 else 4

        def offsets(proj):
            if layout.bits == 16:
                return seg[f"{proj}.weight"].offset // unit, 0, 0
            return (seg[f"{proj}.weight"].offset // unit, seg[f"{proj}.scales"].offset // 2, seg[f"{proj}.biases"].offset // 2)

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        self.out_bias = tuple(seg[f"{p}.bias"].offset // 2 if layout.with_bias else 0 for p in ("gate_up_proj", "down_proj"))
        self.group = layout.group_size if layout.bits != 16 else 1

    def __call__(self, x_sorted: torch.Tensor, pool: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """x_sorted [M, H] (rows grouped by expert, in the order of `slots`), pool [S, record_size] uint8,
        slots / counts: each expert's pool slot and number of rows -> y_sorted [M, H] fp32."""
        L = self.layout
        H, I = L.hidden_size, L.intermediate_size
        M = x_sorted.shape[0]
        assert sum(counts) == M and x_sorted.shape[1] == H
        codes, halves = pool.view(torch.int32), pool.view(torch.bfloat16)
        tile_slot, tile_row, tile_end = expert_tiles(slots, counts, self.block_m, x_sorted.device)
        n_tiles = tile_slot.numel()
        h = torch.empty(M, I, device=x_sorted.device, dtype=x_sorted.dtype)
        y = torch.empty(M, H, device=x_sorted.device, dtype=torch.float32)
        # Multiply in the activations' dtype (fp32: exactly, not tf32). Triton 3.6's interpreter gets
        # bf16 dot products wrong, so there (CI) 16-bit inputs are multiplied in fp32.
        fp32 = x_sorted.dtype == torch.float32 or INTERPRETED
        meta = dict(BITS=L.bits, GROUP=self.group, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    PRECISION="ieee" if x_sorted.dtype == torch.float32 else "tf32", DTYPE=tl.float32 if fp32 else tl.bfloat16,
                    HAS_BIAS=L.with_bias, CLAMPED=self.act.limit is not None, num_warps=self.num_warps,
                    num_stages=self.num_stages)
        act = (float(self.act.limit or 0.0), float(self.act.alpha))
        rw, rh = L.record_size // 4, L.record_size // 2
        _grouped_kernel[(n_tiles, I // self.block_n)](
            x_sorted.contiguous(), codes, halves, tile_slot, tile_row, tile_end, h, H, I, rw, rh, *self.gate_up, I,
            self.out_bias[0], *act, SWIGLU=True, **meta,
        )
        _grouped_kernel[(n_tiles, H // self.block_n)](
            h, codes, halves, tile_slot, tile_row, tile_end, y, I, H, rw, rh, *self.down, 0, self.out_bias[1], *act,
            SWIGLU=False, **meta,
        )
        return y


def moe_grouped_reference(layout: RecordLayout, x_sorted, pool, slots, counts, act: Swiglu = SILU) -> torch.Tensor:
    """The same in plain PyTorch (fp32), one expert at a time."""
    out, start = [], 0
    for slot, count in zip(slots, counts):
        out.append(swiglu_expert(x_sorted[start : start + count].float(), *layout.weights(pool[slot], torch.float32), act,
                                 layout.biases(pool[slot], torch.float32)))
        start += count
    return torch.cat(out)
