"""Routed experts from MXFP4 records (gpt-oss's experts as released) on the GPU: each token's k
experts read from their pool slots, E2M1 codes and E8M0 scales decoded in registers, the expert
biases added and the family's SwiGLU (plain, or gpt-oss's clamped one) applied; two launches:

  gate_up: grid (tokens * k, I / BLOCK_N) -> h [tokens * k, I] = act(gate . x + b_gate, up . x + b_up)
  down:    grid (tokens, H / BLOCK_N)     -> y [tokens, H] = sum_j w_j (down_j . h_j + b_down) (+ residual)

A code is decoded by integer arithmetic, as the CPU kernel does (kernels/cpu_experts.py `_fp4`):
magnitude (2 [e != 0] + m) << (e - [e != 0]) halves; a scale byte s becomes the float with exponent
field s (2^(s - 127); s = 0, 2^-127, as the subnormal bit pattern). Each program reads a row's
bytes at unit stride and the inputs as even and odd planes (a byte's low and high code). Experts
are summed in routing order inside one program: deterministic. Prefill runs the same kernels over
each (token, expert) pair (`grouped`), without sharing an expert's reads between its tokens.

Tested against `layout.weights` + `swiglu_expert` (tests/kernels/test_moe_mxfp4.py, in Triton's
interpreter without a GPU). Not yet timed on a GPU (docs/EXPERIMENTS.md entry 66).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu
from . import INTERPRETED


@triton.jit
def _e2m1(c):
    """int32 E2M1 codes (s e1 e0 m) -> their fp32 values."""
    e = (c >> 1) & 3
    m = c & 1
    normal = (e != 0).to(tl.int32)
    magnitude = (((normal << 1) | m) << (e - normal)).to(tl.float32) * 0.5
    return tl.where((c & 8) != 0, -magnitude, magnitude)


@triton.jit
def _mx_dot(x_ptr, pool_ptr, base, blocks_off, scales_off, rows, row_live, K,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k W[rows, k] x[k] for one MXFP4 projection [N, K] of the record at byte `base` -> [BLOCK_N]."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    half, groups = K // 2, K // 32
    for k0 in range(0, K, BLOCK_K):
        b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
        live = b < half
        mask = row_live[:, None] & live[None, :]
        codes = tl.load(pool_ptr + base + blocks_off + rows[:, None] * half + b[None, :], mask=mask, other=0).to(tl.int32)
        s = tl.load(pool_ptr + base + scales_off + rows[:, None] * groups + (b // 16)[None, :], mask=mask, other=127)
        s = s.to(tl.int32)
        scale = tl.where(s == 0, 1 << 22, s << 23).to(tl.float32, bitcast=True)
        xe = tl.load(x_ptr + 2 * b, mask=live, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + 2 * b + 1, mask=live, other=0.0).to(tl.float32)
        w = _e2m1(codes & 15) * xe[None, :] + _e2m1(codes >> 4) * xo[None, :]
        acc += tl.sum(w * scale, axis=1)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, pool_ptr, halves_ptr, slots_ptr, h_ptr, H, I, record_size, blocks_off, scales_off, bias_off,
                    limit, alpha, K_ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    pair = tl.program_id(0)  # token * K_ROUTED + j
    token = pair // K_ROUTED
    slot = tl.load(slots_ptr + pair).to(tl.int64)
    base = slot * record_size
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < I
    x = x_ptr + token * H
    gate = _mx_dot(x, pool_ptr, base, blocks_off, scales_off, rows, live, H, BLOCK_N, BLOCK_K)
    up = _mx_dot(x, pool_ptr, base, blocks_off, scales_off, rows + I, live, H, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        halves = slot * (record_size // 2) + bias_off
        gate += tl.load(halves_ptr + halves + rows, mask=live, other=0.0).to(tl.float32)
        up += tl.load(halves_ptr + halves + I + rows, mask=live, other=0.0).to(tl.float32)
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    else:
        h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + pair * I + rows, h, mask=live)


@triton.jit
def _down_kernel(h_ptr, pool_ptr, halves_ptr, slots_ptr, weights_ptr, residual_ptr, y_ptr, H, I, record_size, blocks_off,
                 scales_off, bias_off, K_ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(K_ROUTED):  # routing order, inside one program: deterministic
        pair = token * K_ROUTED + j
        slot = tl.load(slots_ptr + pair).to(tl.int64)
        y = _mx_dot(h_ptr + pair * I, pool_ptr, slot * record_size, blocks_off, scales_off, rows, live, I, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            y += tl.load(halves_ptr + slot * (record_size // 2) + bias_off + rows, mask=live, other=0.0).to(tl.float32)
        acc += tl.load(weights_ptr + pair).to(tl.float32) * y
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + token * H + rows, mask=live, other=0.0).to(tl.float32)
    tl.store(y_ptr + token * H + rows, acc.to(y_ptr.dtype.element_ty), mask=live)


class MoeMxfp4:
    """The routed experts of MXFP4 records: `__call__` as MoeGemv's (decode), `grouped` as
    MoeGrouped's (prefill: per-pair outputs, unweighted)."""

    def __init__(self, layout: RecordLayout, act: Swiglu = SILU, block_n: int | None = None, block_k: int = 256,
                 num_warps: int = 4):
        if layout.scheme != "mxfp4":
            raise ValueError(f"MoeMxfp4 computes MXFP4 records, not {layout.scheme} ones")
        self.layout, self.act = layout, act
        seg = {s.name: s for s in layout.segments}

        def offsets(proj: str) -> tuple[int, int, int]:
            bias = seg[f"{proj}.bias"].offset // 2 if layout.with_bias else 0
            return seg[f"{proj}.blocks"].offset, seg[f"{proj}.scales"].offset, bias

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        # the interpreter runs each program as a Python loop pass: fewer, larger programs there
        self.block_n = block_n or (64 if INTERPRETED else 16)
        self.block_k, self.num_warps = block_k, num_warps

    def __call__(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], pool [S, record_size] uint8, slots and weights [T, k] -> y [T, H] fp32 (or into
        `out`): the weighted expert sum, plus `residual` if given."""
        L = self.layout
        T, k = slots.shape
        H, I = L.hidden_size, L.intermediate_size
        assert x.shape == (T, H) and weights.shape == (T, k) and pool.shape[1] == L.record_size
        x, slots, weights = x.contiguous(), slots.contiguous(), weights.contiguous()
        halves = pool.view(torch.bfloat16)
        h = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
        meta = dict(K_ROUTED=k, BLOCK_N=self.block_n, BLOCK_K=self.block_k, HAS_BIAS=L.with_bias, num_warps=self.num_warps)
        clamped = self.act.limit is not None
        _gate_up_kernel[(T * k, triton.cdiv(I, self.block_n))](
            x, pool, halves, slots, h, H, I, L.record_size, *self.gate_up, float(self.act.limit or 0.0),
            float(self.act.alpha), CLAMPED=clamped, **meta)
        y = torch.empty(T, H, device=x.device, dtype=torch.float32) if out is None else out
        _down_kernel[(T, triton.cdiv(H, self.block_n))](
            h, pool, halves, slots, weights, y if residual is None else residual, y, H, I, L.record_size, *self.down,
            HAS_RESIDUAL=residual is not None, **meta)
        return y

    def grouped(self, x_sorted: torch.Tensor, pool: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """x_sorted [M, H] (rows grouped by expert, in the order of `slots`), each expert's slot and
        row count -> y_sorted [M, H] fp32, unweighted: one gathered pass per row."""
        per_row = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), torch.tensor(counts)).to(x_sorted.device)
        ones = torch.ones(per_row.shape[0], 1, device=x_sorted.device)
        return self(x_sorted, pool, per_row[:, None], ones)
