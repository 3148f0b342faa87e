"""Routed experts from MXFP4 records (gpt-oss's experts as released) on the GPU, v2: the E2M1
codes become fp16 in registers and the tensor cores multiply them; the E8M0 scales, the expert
biases and the family's SwiGLU (plain, or gpt-oss's clamped one) are applied in fp32. Launches:

  gate_up: grid (tiles, I / BLOCK_N) -> h [rows, I] = act(x . gate^T + b_gate, x . up^T + b_up)
  down:    grid (tiles, H / BLOCK_N) -> y [rows, H] = h . down^T + b_down (decode: times w_j)
  decode only, sum_pairs: grid (T, H / 1024) -> y [T, H] = sum_j y[t * k + j] (+ residual)

A tile is up to BLOCK_M rows of inputs that one expert multiplies: in decode one (token, expert)
pair (the tile's other rows masked: the tensor core's 16-row minimum costs no memory traffic, and
decode is bound by reading the codes), in prefill up to BLOCK_M of an expert's tokens, so each
code is read once per tile of tokens instead of once per token. Every pair has programs of its
own, and a token's experts are summed in routing order afterwards: deterministic, no atomics.

Arithmetic, a step of GROUPS groups of 32 inputs (one E8M0 scale byte s per group and row):
- A code (s e1 e0 m) placed as fp16 bits (s << 15) | (e1 e0 m << 9) is its E2M1 value times
  2^-14, exactly: e = 0 lands on fp16's subnormals (0.5 = 2^-15 * 2^14), which the tensor cores
  keep. Three integer operations a code, no table.
- Each group's codes are multiplied by 2^(s - top + 13), top the largest scale of the row's groups
  in the step: exact for groups within 2^22 of it (a smaller group's products round below the
  larger's fp32 rounding). The step's fp32 dot product is scaled by 2^(top - 127 + 1), the float
  whose exponent field is top + 1 (s = 255, NaN in E8M0, is refused by the converter).
- The inputs are split into two fp16 parts, hi + lo (hi = fp16(x), lo = fp16(x - hi)), and both
  are multiplied: products exact, sums in fp32, so the result carries fp32's error, ~1e-6
  (inputs beyond fp16's range, |x| > 65504, overflow: activations after a norm and gpt-oss's
  clamped SwiGLU are far inside it).

`mxfp4_reference` is the plain PyTorch definition (`layout.weights` + `swiglu_expert`) the kernels
are tested against (tests/kernels/test_moe_mxfp4.py, in Triton's interpreter without a GPU). v1
(integer decode, an fp32 FMA per weight, byte-wide loads) ran at 6-7% of the copy rate on an H100
(docs/EXPERIMENTS.md entry 66); v2's prediction and measurement: entry 81.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu, swiglu_expert
from ..quant import MXFP4_GROUP
from . import INTERPRETED
from .moe_gemv import expert_act, out_bias
from .moe_grouped import expert_tiles


@triton.jit
def _e2m1_f16(n):
    """int32 E2M1 codes -> their values times 2^-14, as fp16 (exact: e = 0 codes are fp16 subnormals)."""
    return (((n & 7) << 9) | ((n & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _mx_tile(a_ptr, a_rows, a_live, pool_ptr, blocks, scales, n, n_live, K: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr):
    """A[a_rows, :K] (fp32/bf16 rows, element offsets `a_rows` [BLOCK_M], zero where not a_live) times
    W[n, :K]^T of the MXFP4 projection whose codes start at byte `blocks` and scales at byte `scales`
    of the pool (rows n [BLOCK_N], zero where not n_live) -> [BLOCK_M, BLOCK_N] fp32. GROUPS groups
    of each row per step: their codes are scaled relative to the largest of their scales (exact for
    groups within 2^22 of it; a smaller one rounds below the larger's fp32 rounding), the step's dot
    product by the largest."""
    STEP: tl.constexpr = GROUPS * GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    byte = tl.arange(0, STEP // 2)
    col = tl.arange(0, STEP)
    group = tl.arange(0, GROUPS)
    code_rows = pool_ptr + blocks + n.to(tl.int64) * (K // 2)
    scale_rows = pool_ptr + scales + n.to(tl.int64) * (K // GROUP)
    for k0 in tl.range(0, K, STEP, num_stages=STAGES):
        codes = tl.load(code_rows[:, None] + (k0 // 2 + byte)[None, :], mask=n_live[:, None] & (k0 + 2 * byte < K)[None, :],
                        other=0).to(tl.int32)
        # byte b holds inputs 2b (low nibble) and 2b + 1 (high nibble): join interleaves them
        w = tl.reshape(tl.join(_e2m1_f16(codes & 15), _e2m1_f16(codes >> 4)), (BLOCK_N, STEP))
        s = tl.load(scale_rows[:, None] + (k0 // GROUP + group)[None, :], mask=n_live[:, None] & (k0 + group * GROUP < K)[None, :],
                    other=0).to(tl.int32)
        top = tl.max(s, axis=1)
        # 2^(s - top + 13) as fp16 (0 below fp16's normals): the codes become values * 2^(s - top - 1),
        # at most 6 * 2^-1, exact down to 2^-24
        rel = s - top[:, None] + 13
        rel = tl.where(rel >= -14, (rel + 15) << 10, 0).to(tl.int16).to(tl.float16, bitcast=True)
        rel = tl.reshape(tl.broadcast_to(rel[:, :, None], (BLOCK_N, GROUPS, GROUP)), (BLOCK_N, STEP))
        wt = tl.trans((w * rel).to(DOT))
        a = tl.load(a_ptr + a_rows[:, None] + (k0 + col)[None, :], mask=a_live[:, None] & (k0 + col < K)[None, :], other=0.0)
        a = a.to(tl.float32)
        hi = a.to(tl.float16)
        lo = (a - hi.to(tl.float32)).to(tl.float16)
        d = tl.dot(lo.to(DOT), wt, tl.dot(hi.to(DOT), wt, input_precision="ieee"), input_precision="ieee")
        acc += d * ((top + 1) << 23).to(tl.float32, bitcast=True)[None, :]  # 2^(top - 127) * 2^1
    return acc


@triton.jit
def _tile(tile, slots_ptr, tile_row_ptr, tile_end_ptr, K_ROUTED: tl.constexpr, GATHERED: tl.constexpr):
    """A tile's (slot, first row, end row, its first input row): decode's tile is one pair (token *
    K_ROUTED + j) whose input is its token's row; prefill's is rows [first, end) of x_sorted."""
    slot = tl.load(slots_ptr + tile).to(tl.int64)
    # both branches return int64s: the compiler checks both whatever GATHERED is (the H100 refused
    # a decode branch of int32 program ids beside prefill's int64 rows)
    if GATHERED:
        pair = tile.to(tl.int64)
        return slot, pair, pair + 1, pair // K_ROUTED
    first = tl.load(tile_row_ptr + tile).to(tl.int64)
    return slot, first, tl.load(tile_end_ptr + tile).to(tl.int64), first


@triton.jit
def _gate_up_kernel(x_ptr, slots_ptr, tile_row_ptr, tile_end_ptr, pool_ptr, halves_ptr, h_ptr, record_size,
                    blocks_off, scales_off, bias_off, limit, alpha, H: tl.constexpr, I: tl.constexpr,
                    K_ROUTED: tl.constexpr, GATHERED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    CLAMPED: tl.constexpr):
    slot, first, end, x_row = _tile(tl.program_id(0), slots_ptr, tile_row_ptr, tile_end_ptr, K_ROUTED, GATHERED)
    m = tl.arange(0, BLOCK_M)
    a_live = first + m < end
    a_rows = (x_row + m).to(tl.int64) * H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < I
    blocks, scales = slot * record_size + blocks_off, slot * record_size + scales_off
    gate = _mx_tile(x_ptr, a_rows, a_live, pool_ptr, blocks, scales, n, n_live, H, BLOCK_M, BLOCK_N, GROUP, GROUPS, STAGES, DOT)
    up = _mx_tile(x_ptr, a_rows, a_live, pool_ptr, blocks, scales, n + I, n_live, H, BLOCK_M, BLOCK_N, GROUP, GROUPS, STAGES, DOT)
    if HAS_BIAS:
        gate += out_bias(halves_ptr, slot, record_size // 2, bias_off, n, n_live)[None, :]
        up += out_bias(halves_ptr, slot, record_size // 2, bias_off, n + I, n_live)[None, :]
    h = expert_act(gate, up, limit, alpha, CLAMPED)
    tl.store(h_ptr + (first + m).to(tl.int64)[:, None] * I + n[None, :], h, mask=a_live[:, None] & n_live[None, :])


@triton.jit
def _down_kernel(h_ptr, slots_ptr, tile_row_ptr, tile_end_ptr, weights_ptr, pool_ptr, halves_ptr, y_ptr, record_size,
                 blocks_off, scales_off, bias_off, H: tl.constexpr, I: tl.constexpr, K_ROUTED: tl.constexpr,
                 GATHERED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                 STAGES: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Each row's expert output (+ bias): times its routing weight in decode, unweighted in prefill."""
    slot, first, end, _ = _tile(tl.program_id(0), slots_ptr, tile_row_ptr, tile_end_ptr, K_ROUTED, GATHERED)
    m = tl.arange(0, BLOCK_M)
    live = first + m < end
    rows = (first + m).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < H
    base = slot * record_size
    y = _mx_tile(h_ptr, rows * I, live, pool_ptr, base + blocks_off, base + scales_off, n, n_live, I, BLOCK_M,
                 BLOCK_N, GROUP, GROUPS, STAGES, DOT)
    if HAS_BIAS:
        y += out_bias(halves_ptr, slot, record_size // 2, bias_off, n, n_live)[None, :]
    if GATHERED:
        y *= tl.load(weights_ptr + rows, mask=live, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[:, None] * H + n[None, :], y, mask=live[:, None] & n_live[None, :])


@triton.jit
def _sum_pairs_kernel(y_pairs_ptr, residual_ptr, y_ptr, H: tl.constexpr, K_ROUTED: tl.constexpr,
                      BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """y[t] = sum_j y_pairs[t * K_ROUTED + j] (+ residual[t]), in routing order: deterministic."""
    token = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = n < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(K_ROUTED):
        acc += tl.load(y_pairs_ptr + (token * K_ROUTED + j) * H + n, mask=live, other=0.0)
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + token * H + n, mask=live, other=0.0).to(tl.float32)
    tl.store(y_ptr + token * H + n, acc.to(y_ptr.dtype.element_ty), mask=live)


class MoeMxfp4:
    """The routed experts of MXFP4 records: `__call__` as MoeGemv's (decode), `grouped` as
    MoeGrouped's (prefill: per-row outputs, unweighted). block_n rows of each projection per
    program, `groups` groups of 32 inputs per loop step, `stages` steps' loads in flight;
    block_m tokens per prefill tile."""

    def __init__(self, layout: RecordLayout, act: Swiglu = SILU, block_n: int | None = None, block_m: int = 64,
                 groups: int = 2, num_warps: int = 4, stages: int = 3):
        if layout.scheme != "mxfp4":
            raise ValueError(f"MoeMxfp4 computes MXFP4 records, not {layout.scheme} ones")
        if layout.hidden_size % MXFP4_GROUP or layout.intermediate_size % MXFP4_GROUP:
            raise ValueError(f"MXFP4 rows are whole groups of {MXFP4_GROUP}: hidden {layout.hidden_size}, "
                             f"intermediate {layout.intermediate_size}")
        self.layout, self.act = layout, act
        seg = {s.name: s for s in layout.segments}

        def offsets(proj: str) -> tuple[int, int, int]:
            bias = seg[f"{proj}.bias"].offset // 2 if layout.with_bias else 0
            return seg[f"{proj}.blocks"].offset, seg[f"{proj}.scales"].offset, bias

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        # the interpreter runs each program as a Python loop pass: fewer, larger programs there
        self.block_n = block_n or (64 if INTERPRETED else 32)
        self.block_m, self.groups, self.num_warps, self.stages = block_m, groups, num_warps, stages
        # Triton 3.6's interpreter multiplies 16-bit dots wrongly: there the fp16 parts are multiplied
        # as fp32 (the same values, so the same products)
        self.dot = tl.float32 if INTERPRETED else tl.float16

    def _launch(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, tile_row: torch.Tensor,
                tile_end: torch.Tensor, weights: torch.Tensor, k: int, gathered: bool, block_m: int) -> torch.Tensor:
        """gate_up then down over the tiles -> each row's expert output [rows, H] fp32 (decode: weighted)."""
        L = self.layout
        H, I = L.hidden_size, L.intermediate_size
        rows = x.shape[0] * k if gathered else x.shape[0]
        meta = dict(H=H, I=I, K_ROUTED=k, GATHERED=gathered, BLOCK_M=block_m, BLOCK_N=self.block_n, GROUP=MXFP4_GROUP,
                    GROUPS=self.groups, STAGES=self.stages, DOT=self.dot, HAS_BIAS=L.with_bias, num_warps=self.num_warps)
        halves = pool.view(torch.bfloat16)
        h = torch.empty(rows, I, device=x.device, dtype=torch.float32)
        _gate_up_kernel[(slots.numel(), triton.cdiv(I, self.block_n))](
            x, slots, tile_row, tile_end, pool, halves, h, L.record_size, *self.gate_up, float(self.act.limit or 0.0),
            float(self.act.alpha), CLAMPED=self.act.limit is not None, **meta)
        y = torch.empty(rows, H, device=x.device, dtype=torch.float32)
        _down_kernel[(slots.numel(), triton.cdiv(H, self.block_n))](
            h, slots, tile_row, tile_end, weights, pool, halves, y, L.record_size, *self.down, **meta)
        return y

    def __call__(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], pool [S, record_size] uint8, slots and weights [T, k] -> y [T, H] fp32 (or into
        `out`): the weighted expert sum, plus `residual` if given."""
        L = self.layout
        T, k = slots.shape
        H = L.hidden_size
        assert x.shape == (T, H) and weights.shape == (T, k) and pool.shape[1] == L.record_size
        x, slots, weights = x.contiguous(), slots.contiguous(), weights.contiguous()
        # one tile per (token, expert) pair: every expert's rows in programs of their own (a token's k
        # experts summed by one program would leave most SMs idle at one token)
        y_pairs = self._launch(x, pool, slots, slots, slots, weights, k, True, 16)
        y = torch.empty(T, H, device=x.device, dtype=torch.float32) if out is None else out
        block = min(1024, triton.next_power_of_2(H))
        _sum_pairs_kernel[(T, triton.cdiv(H, block))](y_pairs, y if residual is None else residual, y, H=H, K_ROUTED=k,
                                                      BLOCK=block, HAS_RESIDUAL=residual is not None)
        return y

    def grouped(self, x_sorted: torch.Tensor, pool: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """x_sorted [M, H] (rows grouped by expert, in the order of `slots`), each expert's slot and
        row count -> y_sorted [M, H] fp32, unweighted: each expert's codes read once per block_m rows."""
        assert sum(counts) == x_sorted.shape[0] and x_sorted.shape[1] == self.layout.hidden_size
        tile_slot, tile_row, tile_end = expert_tiles(slots, counts, self.block_m, x_sorted.device)
        # (prefill's outputs are unweighted: the weights argument is not read)
        return self._launch(x_sorted.contiguous(), pool, tile_slot, tile_row, tile_end, tile_slot, 1, False, self.block_m)


def mxfp4_reference(layout: RecordLayout, act: Swiglu, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
    """One expert of an MXFP4 record on x [T, H], in plain PyTorch (fp32)."""
    return swiglu_expert(x.float(), *layout.weights(record, torch.float32), act, layout.biases(record, torch.float32))
