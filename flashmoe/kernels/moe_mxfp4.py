"""Routed experts from MXFP4 records (gpt-oss's experts as released) on the GPU, v2: the E2M1
codes become fp16 in registers and the tensor cores multiply them; the E8M0 scales, the expert
biases and the family's SwiGLU (plain, or gpt-oss's clamped one) are applied in fp32. Two launches:

  gate_up: grid (tiles, I / BLOCK_N) -> h [pairs, I] = act(x . gate^T + b_gate, x . up^T + b_up)
  down:    grid (tokens, H / BLOCK_N) -> y [T, H] = sum_j w_j (down_j . h_j + b_down) (+ residual)   decode
           grid (tiles, H / BLOCK_N)  -> y [pairs, H] = down . h + b_down (unweighted)             prefill

A tile is BLOCK_M rows of inputs that one expert multiplies: in decode one (token, expert) pair
(the tile's other rows masked; the tensor core's 16-row minimum costs no memory traffic, and
decode is bound by reading the codes), in prefill up to BLOCK_M of an expert's tokens, so each
code is read once per tile of tokens instead of once per token.

Arithmetic, group by group (32 inputs, one scale byte s per row):
- A code (s e1 e0 m) placed as fp16 bits (s << 15) | (e1 e0 m << 9) is its E2M1 value times
  2^-14, exactly: e = 0 lands on fp16's subnormals (0.5 = 2^-15 * 2^14), which the tensor cores
  keep. Three integer operations a code, no table.
- The fp32 inputs are split into two fp16 parts, hi + lo (hi = fp16(x), lo = fp16(x - hi)), and
  both are multiplied: products exact, sums in fp32, so the result carries fp32's error to ~1e-6
  (inputs beyond fp16's range, |x| > 65504, overflow: activations after a norm and gpt-oss's
  clamped SwiGLU are far inside it).
- The group's fp32 dot product is scaled by 2^(s - 127) * 2^14: the float whose exponent field is
  s + 14 (s = 255, NaN in E8M0, is refused by the converter).

`MoeMxfp4` picks the tiles; `mxfp4_reference` is the plain PyTorch definition (`layout.weights` +
`swiglu_expert`) the kernels are tested against (tests/kernels/test_moe_mxfp4.py, in Triton's
interpreter without a GPU). v1 (integer decode, fp32 FMA per weight, byte-wide loads) ran at 6-7%
of the copy rate on an H100 (docs/EXPERIMENTS.md entry 66).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu, swiglu_expert
from . import INTERPRETED

GROUP = 32  # inputs per E8M0 scale: 16 bytes of codes


@triton.jit
def _e2m1_f16(n):
    """int32 E2M1 codes -> their values times 2^-14, as fp16 (exact: e = 0 codes are fp16 subnormals)."""
    return (((n & 7) << 9) | ((n & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _mx_tile(a_ptr, a_rows, a_live, pool_ptr, blocks, scales, n, n_live, K: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr):
    """A[a_rows, :K] (fp32/bf16 rows, element offsets `a_rows` [BLOCK_M], zero where not a_live) times
    W[n, :K]^T of the MXFP4 projection whose codes start at byte `blocks` and scales at byte `scales`
    of the pool (rows n [BLOCK_N], zero where not n_live) -> [BLOCK_M, BLOCK_N] fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    byte = tl.arange(0, GROUP // 2)
    col = tl.arange(0, GROUP)
    code_rows = pool_ptr + blocks + n.to(tl.int64) * (K // 2)
    scale_rows = pool_ptr + scales + n.to(tl.int64) * (K // GROUP)
    for g in tl.range(0, K // GROUP, num_stages=STAGES):
        codes = tl.load(code_rows[:, None] + (g * (GROUP // 2) + byte)[None, :], mask=n_live[:, None], other=0)
        codes = codes.to(tl.int32)
        # byte b holds inputs 2b (low nibble) and 2b + 1 (high nibble): join interleaves them
        w = tl.reshape(tl.join(_e2m1_f16(codes & 15), _e2m1_f16(codes >> 4)), (BLOCK_N, GROUP)).to(DOT)
        a = tl.load(a_ptr + a_rows[:, None] + (g * GROUP + col)[None, :], mask=a_live[:, None], other=0.0)
        a = a.to(tl.float32)
        hi = a.to(tl.float16)
        lo = (a - hi.to(tl.float32)).to(tl.float16)
        wt = tl.trans(w)
        d = tl.dot(lo.to(DOT), wt, tl.dot(hi.to(DOT), wt, input_precision="ieee"), input_precision="ieee")
        s = tl.load(scale_rows + g, mask=n_live, other=0).to(tl.int32)
        acc += d * ((s + 14) << 23).to(tl.float32, bitcast=True)[None, :]
    return acc


@triton.jit
def _bias(halves_ptr, at, n, n_live):
    """A record's bf16 bias values at half-word offset `at` + n, as fp32 (0 past the rows)."""
    return tl.load(halves_ptr + at + n, mask=n_live, other=0.0).to(tl.float32)


@triton.jit
def _gate_up_kernel(x_ptr, slots_ptr, tile_row_ptr, tile_end_ptr, pool_ptr, halves_ptr, h_ptr, record_size,
                    blocks_off, scales_off, bias_off, limit, alpha, H: tl.constexpr, I: tl.constexpr,
                    K_ROUTED: tl.constexpr, GATHERED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    STAGES: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    tile = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + tile).to(tl.int64)
    if GATHERED:  # decode: tile = pair = token * K_ROUTED + j, one row, x's row the token's
        first, end, x_row = tile, tile + 1, tile // K_ROUTED
    else:  # prefill: rows [first, end) of x_sorted, one expert's
        first, end = tl.load(tile_row_ptr + tile), tl.load(tile_end_ptr + tile)
        x_row = first
    a_live = first + m < end
    a_rows = (x_row + m).to(tl.int64) * H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < I
    base = slot * record_size
    blocks, scales = base + blocks_off, base + scales_off
    gate = _mx_tile(x_ptr, a_rows, a_live, pool_ptr, blocks, scales, n, n_live, H, BLOCK_M, BLOCK_N, STAGES, DOT)
    up = _mx_tile(x_ptr, a_rows, a_live, pool_ptr, blocks, scales, n + I, n_live, H, BLOCK_M, BLOCK_N, STAGES, DOT)
    if HAS_BIAS:
        at = slot * (record_size // 2) + bias_off
        gate += _bias(halves_ptr, at, n, n_live)[None, :]
        up += _bias(halves_ptr, at, n + I, n_live)[None, :]
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    else:
        h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + (first + m).to(tl.int64)[:, None] * I + n[None, :], h, mask=a_live[:, None] & n_live[None, :])


@triton.jit
def _down_sum_kernel(h_ptr, slots_ptr, weights_ptr, residual_ptr, pool_ptr, halves_ptr, y_ptr, record_size,
                     blocks_off, scales_off, bias_off, H: tl.constexpr, I: tl.constexpr, K_ROUTED: tl.constexpr,
                     BLOCK_N: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    """Decode: a token's experts summed in routing order inside one program (deterministic)."""
    token = tl.program_id(0)
    m = tl.arange(0, 16)  # the tensor core's smallest tile; only row 0 is read
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(K_ROUTED):
        pair = token * K_ROUTED + j
        slot = tl.load(slots_ptr + pair).to(tl.int64)
        base = slot * record_size
        d = _mx_tile(h_ptr, (pair + m).to(tl.int64) * I, m < 1, pool_ptr, base + blocks_off, base + scales_off, n,
                     n_live, I, 16, BLOCK_N, STAGES, DOT)
        y = tl.sum(d, axis=0)  # the masked rows are zeros
        if HAS_BIAS:
            y += _bias(halves_ptr, slot * (record_size // 2) + bias_off, n, n_live)
        acc += tl.load(weights_ptr + pair).to(tl.float32) * y
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + token * H + n, mask=n_live, other=0.0).to(tl.float32)
    tl.store(y_ptr + token * H + n, acc.to(y_ptr.dtype.element_ty), mask=n_live)


@triton.jit
def _down_rows_kernel(h_ptr, slots_ptr, tile_row_ptr, tile_end_ptr, pool_ptr, halves_ptr, y_ptr, record_size,
                      blocks_off, scales_off, bias_off, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, STAGES: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Prefill: each row's expert output, unweighted."""
    tile = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + tile).to(tl.int64)
    first, end = tl.load(tile_row_ptr + tile), tl.load(tile_end_ptr + tile)
    live = first + m < end
    rows = (first + m).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < H
    base = slot * record_size
    y = _mx_tile(h_ptr, rows * I, live, pool_ptr, base + blocks_off, base + scales_off, n, n_live, I, BLOCK_M,
                 BLOCK_N, STAGES, DOT)
    if HAS_BIAS:
        y += _bias(halves_ptr, slot * (record_size // 2) + bias_off, n, n_live)[None, :]
    tl.store(y_ptr + rows[:, None] * H + n[None, :], y, mask=live[:, None] & n_live[None, :])


class MoeMxfp4:
    """The routed experts of MXFP4 records: `__call__` as MoeGemv's (decode), `grouped` as
    MoeGrouped's (prefill: per-row outputs, unweighted). block_n rows of each projection per
    program; block_m tokens per prefill tile; stages: the code loads in flight per program."""

    def __init__(self, layout: RecordLayout, act: Swiglu = SILU, block_n: int | None = None, block_m: int = 64,
                 num_warps: int = 4, stages: int = 3):
        if layout.scheme != "mxfp4":
            raise ValueError(f"MoeMxfp4 computes MXFP4 records, not {layout.scheme} ones")
        if layout.hidden_size % GROUP or layout.intermediate_size % GROUP:
            raise ValueError(f"MXFP4 rows are whole groups of {GROUP}: hidden {layout.hidden_size}, "
                             f"intermediate {layout.intermediate_size}")
        self.layout, self.act = layout, act
        seg = {s.name: s for s in layout.segments}

        def offsets(proj: str) -> tuple[int, int, int]:
            bias = seg[f"{proj}.bias"].offset // 2 if layout.with_bias else 0
            return seg[f"{proj}.blocks"].offset, seg[f"{proj}.scales"].offset, bias

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        # the interpreter runs each program as a Python loop pass: fewer, larger programs there
        self.block_n = block_n or (64 if INTERPRETED else 32)
        self.block_m, self.num_warps, self.stages = block_m, num_warps, stages
        # Triton 3.6's interpreter multiplies 16-bit dots wrongly: there the fp16 parts are multiplied
        # as fp32 (the same values, so the same products)
        self.dot = tl.float32 if INTERPRETED else tl.float16

    def _meta(self, **extra) -> dict:
        L = self.layout
        return dict(H=L.hidden_size, I=L.intermediate_size, BLOCK_N=self.block_n, STAGES=self.stages, DOT=self.dot,
                    HAS_BIAS=L.with_bias, num_warps=self.num_warps, **extra)

    def _gate_up(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, tile_row, tile_end, h: torch.Tensor,
                 k: int, gathered: bool, block_m: int) -> None:
        L = self.layout
        _gate_up_kernel[(slots.numel(), triton.cdiv(L.intermediate_size, self.block_n))](
            x, slots, tile_row, tile_end, pool, pool.view(torch.bfloat16), h, L.record_size, *self.gate_up,
            float(self.act.limit or 0.0), float(self.act.alpha),
            **self._meta(K_ROUTED=k, GATHERED=gathered, BLOCK_M=block_m, CLAMPED=self.act.limit is not None))

    def __call__(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], pool [S, record_size] uint8, slots and weights [T, k] -> y [T, H] fp32 (or into
        `out`): the weighted expert sum, plus `residual` if given."""
        L = self.layout
        T, k = slots.shape
        H, I = L.hidden_size, L.intermediate_size
        assert x.shape == (T, H) and weights.shape == (T, k) and pool.shape[1] == L.record_size
        x, slots, weights = x.contiguous(), slots.contiguous(), weights.contiguous()
        h = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
        self._gate_up(x, pool, slots, slots, slots, h, k, True, 16)
        y = torch.empty(T, H, device=x.device, dtype=torch.float32) if out is None else out
        _down_sum_kernel[(T, triton.cdiv(H, self.block_n))](
            h, slots, weights, y if residual is None else residual, pool, pool.view(torch.bfloat16), y, L.record_size,
            *self.down, **self._meta(K_ROUTED=k, HAS_RESIDUAL=residual is not None))
        return y

    def tiles(self, slots: list[int], counts: list[int], device) -> tuple[torch.Tensor, ...]:
        """One tile per block_m rows of each expert -> (slot, first row, end row) tensors."""
        tile_slot, tile_row, tile_end, start = [], [], [], 0
        for slot, count in zip(slots, counts):
            for row in range(start, start + count, self.block_m):
                tile_slot.append(slot)
                tile_row.append(row)
                tile_end.append(start + count)
            start += count
        return tuple(torch.tensor(t, dtype=d).to(device, non_blocking=True)
                     for t, d in ((tile_slot, torch.int64), (tile_row, torch.int32), (tile_end, torch.int32)))

    def grouped(self, x_sorted: torch.Tensor, pool: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """x_sorted [M, H] (rows grouped by expert, in the order of `slots`), each expert's slot and
        row count -> y_sorted [M, H] fp32, unweighted: each expert's codes read once per block_m rows."""
        L = self.layout
        M = x_sorted.shape[0]
        assert sum(counts) == M and x_sorted.shape[1] == L.hidden_size
        tile_slot, tile_row, tile_end = self.tiles(slots, counts, x_sorted.device)
        h = torch.empty(M, L.intermediate_size, device=x_sorted.device, dtype=torch.float32)
        self._gate_up(x_sorted.contiguous(), pool, tile_slot, tile_row, tile_end, h, 1, False, self.block_m)
        y = torch.empty(M, L.hidden_size, device=x_sorted.device, dtype=torch.float32)
        _down_rows_kernel[(tile_slot.numel(), triton.cdiv(L.hidden_size, self.block_n))](
            h, tile_slot, tile_row, tile_end, pool, pool.view(torch.bfloat16), y, L.record_size, *self.down,
            **self._meta(BLOCK_M=self.block_m))
        return y


def mxfp4_reference(layout: RecordLayout, act: Swiglu, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
    """One expert of an MXFP4 record on x [T, H], in plain PyTorch (fp32)."""
    return swiglu_expert(x.float(), *layout.weights(record, torch.float32), act, layout.biases(record, torch.float32))
