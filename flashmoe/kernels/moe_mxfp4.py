"""Routed experts from MXFP4 records (gpt-oss's experts as released) on the GPU, v3. Decode
multiplies on the CUDA cores with fp32 inputs, prefill on the tensor cores with fp16 inputs; the
E8M0 scales, the expert biases and the family's SwiGLU (plain, or gpt-oss's clamped one) in fp32.

Decoding a code: an int32 word holds 8 codes (code c in bits 4c..4c+3). Its two 16-bit halves are
16 bits apart, like codes c and c + 4, so one shift and one mask place a code in each half at once:
magnitude (e1 e0 m) to bits 9-11, sign to 15 gives the fp16 whose value is the E2M1 value times
2^-14, exactly (e = 0 lands on fp16's subnormals: 0.5 = 2^-15 * 2^14). Two codes cost two shifts
and two LOP3s (one an AND-OR), ~2 integer instructions a code; a 16-entry lookup would cost a
byte extraction and an index per code before any table read (Triton has no PRMT lookup).

Decode, three launches (every (token, expert) pair in programs of its own; a token's experts
summed in routing order afterwards: deterministic, no atomics):

  gate_up:   grid (T * k, I / block_n) -> h [T * k, I] fp32 = act(x . gate^T + b, x . up^T + b)
  down:      grid (T * k, H / block_n) -> y [T * k, H] = w_j * (h . down^T + b)
  sum_pairs: grid (T, H / 1024)        -> y [T, H] = sum_j y[t * k + j] (+ residual)

- Tile [rows, groups, 4 words], one lane per row and group (`_mx_rows`, the affine kernels'
  structure, moe_gemv.py v4): a lane's 16-byte load is its row's group of 32 codes, and it reads
  the group's 32 inputs itself, so codes and inputs meet in registers with no shared-memory
  layout conversion of the codes (v2's tensor-core tile stored each decoded code to shared
  memory one by one: Triton puts the joined fp16 tile in a column-major shared layout).
- One FMA a code in fp32: the fp16 value widened exactly (HADD2.F32), times the fp32 input. One
  accumulator per lane and word; the group's scale 2^(s - 127) multiplies the group's partial
  sum in fp32, never the codes: no scale is broadcast across a tile, and every scale exponent is
  exact (no relative scaling that flushes groups far below a row's largest). Products and sums
  carry fp32's rounding: 2-3e-7 from the reference (interpreter), as v2's hi + lo split, at half the
  multiplies. No tensor cores: a token is one row of a 16-row MMA, and the decode is bound by
  the per-code instructions, not by multiplies.
- gate and up rows interleaved in one tile: one pass over x, both rows' codes in flight; loads
  pipelined `stages` steps ahead.

Prefill, two launches over tiles of up to block_m rows of one expert (x_sorted grouped by expert):
the tensor cores multiply x_sorted and h rounded to fp16 (11 significant bits, |values| up to
65504: activations after a norm and gpt-oss's clamped SwiGLU are far inside it) by the decoded
codes (exact in fp16), one dot per group of 32 inputs whose fp32 output is scaled by the group's
2^(s - 127) per row (`_mx_tile`). Each code is decoded once per tile of tokens.

Triton's `tl.dot_scaled` (e2m1 with e8m0 scales) is not used: Triton 3.6 documents it on Hopper as
software emulation (both operands upcast to bf16, the scales multiplied into every element: the
per-code work that made v2 slow, with bf16's 8-bit inputs), and its interpreter does not run it.

`mxfp4_reference` is the plain PyTorch definition (`layout.weights` + `swiglu_expert`) the kernels
are tested against (tests/kernels/test_moe_mxfp4.py, in Triton's interpreter without a GPU). v1
(integer decode, an FMA per weight with byte-wide loads) ran at 6-7% of the copy rate on an H100
(docs/EXPERIMENTS.md entry 66), v2 (tensor cores on fp32 inputs split hi + lo, codes scaled per
step) at 11-12% (entry 90).
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
def _e2m1_pair(w, P: tl.constexpr):
    """Codes P and P + 4 of each int32 word w (code i in bits 4i..4i+3) as the two fp16 halves of
    one word: magnitude bits (e1 e0 m) to 9-11 and 25-27, sign bit to 15 and 31. The word's 16-bit
    halves stay 16 bits apart, so one shift and one mask place a code of each half at once."""
    if P == 3:
        mag = (w >> 3) & 0x0E000E00
    else:
        mag = (w << (9 - 4 * P)) & 0x0E000E00
    return mag | ((w << (12 - 4 * P)) & -0x7FFF8000)  # 0x80008000 as an int32


@triton.jit
def _e2m1_halves(w, P: tl.constexpr):
    """[R, W] int32 words -> [R, W, 2] fp16: codes P and P + 4 of each word, times 2^-14."""
    r = _e2m1_pair(w, P)
    return tl.join(r.to(tl.int16).to(tl.float16, bitcast=True), (r >> 16).to(tl.int16).to(tl.float16, bitcast=True))


@triton.jit
def _e2m1_group(w):
    """[R, 4] int32 words (a group of 32 codes of each row, code c of a word in bits 4c..4c+3) ->
    [R, 32] fp16 values times 2^-14, in the codes' order (exact: e = 0 codes are fp16 subnormals)."""
    # index (h, q, r) of the last three axes holds code 4h + 2q + r: row-major, the codes' own order
    both = tl.join(tl.join(_e2m1_halves(w, 0), _e2m1_halves(w, 2)), tl.join(_e2m1_halves(w, 1), _e2m1_halves(w, 3)))
    return tl.reshape(both, (w.shape[0], 32))


@triton.jit
def _e8m0(s):
    """int32 E8M0 bytes -> 2^(s - 127) as fp32: the byte is the exponent field (s = 0 the subnormal 2^-127)."""
    return tl.where(s > 0, s << 23, 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def _mx_tile(a_ptr, a_rows, a_live, codes_ptr, pool_ptr, blocks, scales, n, n_live, K: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
             STAGES: tl.constexpr, DOT: tl.constexpr):
    """A[a_rows, :K] (fp16 rows, element offsets `a_rows` [BLOCK_M], zero where not a_live) times
    W[n, :K]^T of the MXFP4 projection whose codes start at word `blocks` of the pool's int32 view
    and scales at byte `scales` (rows n [BLOCK_N], zero where not n_live) -> [BLOCK_M, BLOCK_N]
    fp32. GROUPS groups of 32 inputs per loop step; each group one dot of its own, scaled by its
    rows' E8M0 factors in fp32."""
    WORDS: tl.constexpr = GROUP // 8  # int32 words of a group's codes: one 16-byte vector per row
    # the codes are the dot's first operand (rows x inputs, as they are read): the accumulator is
    # [rows, tokens], each group's scale a per-row factor, transposed once at the end
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    word = tl.arange(0, WORDS)
    col = tl.arange(0, GROUP)
    code_rows = codes_ptr + blocks + n.to(tl.int64) * (K // 8)
    scale_rows = pool_ptr + scales + n.to(tl.int64) * (K // GROUP)
    for k0 in tl.range(0, K, GROUPS * GROUP, num_stages=STAGES):
        for g in tl.static_range(GROUPS):
            kg = k0 + g * GROUP
            inside = kg < K  # the last step of a row that is not whole steps
            w = tl.load(code_rows[:, None] + (kg // 8 + word)[None, :], mask=n_live[:, None] & inside, other=0)
            s = tl.load(scale_rows + kg // GROUP, mask=n_live & inside, other=0).to(tl.int32)
            a = tl.load(a_ptr + a_rows[None, :] + (kg + col)[:, None], mask=a_live[None, :] & inside, other=0.0)
            d = tl.dot(_e2m1_group(w).to(DOT), a.to(DOT))
            acc += d * _e8m0(s)[:, None]
    return tl.trans(acc * 16384.0)  # the codes' 2^-14


@triton.jit
def _pair_dot(w, P: tl.constexpr, x, acc):
    """acc + codes P and P + 4 of [R, G, 4] int32 words times their inputs x [G, 4, 2] -> [R, G, 4]
    fp32: each code's value * 2^-14 (exact in fp16, widened exactly) in one FMA with its input."""
    r = _e2m1_pair(w, P)
    lo = r.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (r >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    x_lo, x_hi = tl.split(x)
    return hi * x_hi[None, :, :] + (lo * x_lo[None, :, :] + acc)


@triton.jit
def _mx_rows(x_ptr, codes_ptr, pool_ptr, blocks, scales, n, n_live, K: tl.constexpr, GROUP: tl.constexpr,
             GROUPS: tl.constexpr, STAGES: tl.constexpr):
    """Decode's matvec: W[n, :K] . x[:K] (x fp32) of the MXFP4 projection whose codes start at word
    `blocks` of the pool's int32 view and scales at byte `scales` (rows n [R], zero where not
    n_live) -> [R] fp32. Tile [R rows, GROUPS groups, 4 words]: each lane reads one group of one
    row (16 bytes) and all 32 of its inputs, so codes and inputs meet in the lane without a layout
    conversion; one accumulator per row and group, summed across the lanes once at the end."""
    WORDS: tl.constexpr = GROUP // 8
    g = tl.arange(0, GROUPS)
    word = tl.arange(0, WORDS)
    acc = tl.zeros([n.shape[0], GROUPS, WORDS], dtype=tl.float32)
    code_rows = codes_ptr + blocks + n.to(tl.int64) * (K // 8)
    scale_rows = pool_ptr + scales + n.to(tl.int64) * (K // GROUP)
    xin = (g * GROUP)[:, None, None] + (8 * word)[None, :, None] + tl.arange(0, 8)[None, None, :]  # [G, 4, 8]
    for k0 in tl.range(0, K, GROUPS * GROUP, num_stages=STAGES):
        inside = k0 + g * GROUP < K  # the groups of the row's last step that lie past its end: none read
        live = n_live[:, None] & inside[None, :]
        w = tl.load(code_rows[:, None, None] + (k0 // 8 + g * WORDS)[None, :, None] + word[None, None, :],
                    mask=live[:, :, None], other=0)
        s = tl.load(scale_rows[:, None] + (k0 // GROUP + g)[None, :], mask=live, other=0).to(tl.int32)
        x = tl.load(x_ptr + k0 + xin, mask=inside[:, None, None], other=0.0)
        # input c of a word is x[g, w, c], c = 4h + 2a + b: the pair of codes P = 2a + b (h = 0, 1)
        x_b0, x_b1 = tl.split(tl.reshape(x, (GROUPS, WORDS, 2, 2, 2)))
        x_p0, x_p2 = tl.split(x_b0)
        x_p1, x_p3 = tl.split(x_b1)
        part = _pair_dot(w, 3, x_p3, _pair_dot(w, 2, x_p2, _pair_dot(w, 1, x_p1, _pair_dot(w, 0, x_p0, 0.0))))
        # the group's sums, one per word (lanes hold their words), times its scale in fp32
        acc += part * _e8m0(s)[:, :, None]
    return tl.sum(tl.sum(acc, axis=2), axis=1) * 16384.0  # the codes' 2^-14


@triton.jit
def _gate_up_rows_kernel(x_ptr, slots_ptr, codes_ptr, pool_ptr, halves_ptr, h_ptr, record_size, record_words,
                         blocks_off, scales_off, bias_off, limit, alpha, H: tl.constexpr, I: tl.constexpr,
                         K_ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                         STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    """Decode, one (token, expert) pair per program row: h[pair, n] = act(gate_n . x + b, up_n . x + b)."""
    pair = tl.program_id(0)
    slot = tl.load(slots_ptr + pair).to(tl.int64)
    rr = tl.arange(0, 2 * BLOCK_N)
    n = tl.program_id(1) * BLOCK_N + rr // 2
    n_live = n < I
    rows = n + (rr % 2) * I  # gate and up rows interleaved: one pass over x, both rows' codes in flight
    y = _mx_rows(x_ptr + (pair // K_ROUTED).to(tl.int64) * H, codes_ptr, pool_ptr, slot * record_words + blocks_off,
                 slot * record_size + scales_off, rows, n_live, H, GROUP, GROUPS, STAGES)
    if HAS_BIAS:
        y += out_bias(halves_ptr, slot, record_size // 2, bias_off, rows, n_live)
    gate, up = tl.split(tl.reshape(y, (BLOCK_N, 2)))
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + pair.to(tl.int64) * I + n, expert_act(gate, up, limit, alpha, CLAMPED), mask=n < I)


@triton.jit
def _down_rows_kernel(h_ptr, slots_ptr, weights_ptr, codes_ptr, pool_ptr, halves_ptr, y_ptr, record_size, record_words,
                      blocks_off, scales_off, bias_off, H: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Decode: y[pair, n] = w_pair * (down_n . h[pair] + b)."""
    pair = tl.program_id(0)
    slot = tl.load(slots_ptr + pair).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < H
    y = _mx_rows(h_ptr + pair.to(tl.int64) * I, codes_ptr, pool_ptr, slot * record_words + blocks_off,
                 slot * record_size + scales_off, n, n_live, I, GROUP, GROUPS, STAGES)
    if HAS_BIAS:
        y += out_bias(halves_ptr, slot, record_size // 2, bias_off, n, n_live)
    tl.store(y_ptr + pair.to(tl.int64) * H + n, y * tl.load(weights_ptr + pair).to(tl.float32), mask=n_live)


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


@triton.jit
def _gate_up_kernel(x_ptr, slots_ptr, tile_row_ptr, tile_end_ptr, codes_ptr, pool_ptr, halves_ptr, h_ptr, record_size,
                    record_words, blocks_off, scales_off, bias_off, limit, alpha, H: tl.constexpr, I: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                    STAGES: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    """Prefill: h [rows, I] fp16 of a tile's rows [first, end) of x_sorted (fp16), one expert's."""
    tile = tl.program_id(0)
    slot = tl.load(slots_ptr + tile).to(tl.int64)
    first = tl.load(tile_row_ptr + tile).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    a_live = first + m < tl.load(tile_end_ptr + tile)
    a_rows = (first + m) * H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < I
    blocks, scales = slot * record_words + blocks_off, slot * record_size + scales_off
    gate = _mx_tile(x_ptr, a_rows, a_live, codes_ptr, pool_ptr, blocks, scales, n, n_live, H, BLOCK_M, BLOCK_N, GROUP,
                    GROUPS, STAGES, DOT)
    up = _mx_tile(x_ptr, a_rows, a_live, codes_ptr, pool_ptr, blocks, scales, n + I, n_live, H, BLOCK_M, BLOCK_N, GROUP,
                  GROUPS, STAGES, DOT)
    if HAS_BIAS:
        gate += out_bias(halves_ptr, slot, record_size // 2, bias_off, n, n_live)[None, :]
        up += out_bias(halves_ptr, slot, record_size // 2, bias_off, n + I, n_live)[None, :]
    h = expert_act(gate, up, limit, alpha, CLAMPED)
    tl.store(h_ptr + (first + m)[:, None] * I + n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=a_live[:, None] & n_live[None, :])


@triton.jit
def _down_kernel(h_ptr, slots_ptr, tile_row_ptr, tile_end_ptr, codes_ptr, pool_ptr, halves_ptr, y_ptr, record_size,
                 record_words, blocks_off, scales_off, bias_off, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr,
                 DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Prefill: each row's expert output (+ bias), unweighted."""
    tile = tl.program_id(0)
    slot = tl.load(slots_ptr + tile).to(tl.int64)
    first = tl.load(tile_row_ptr + tile).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    live = first + m < tl.load(tile_end_ptr + tile)
    rows = first + m
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = n < H
    y = _mx_tile(h_ptr, rows * I, live, codes_ptr, pool_ptr, slot * record_words + blocks_off,
                 slot * record_size + scales_off, n, n_live, I, BLOCK_M, BLOCK_N, GROUP, GROUPS, STAGES, DOT)
    if HAS_BIAS:
        y += out_bias(halves_ptr, slot, record_size // 2, bias_off, n, n_live)[None, :]
    tl.store(y_ptr + rows[:, None] * H + n[None, :], y, mask=live[:, None] & n_live[None, :])


class MoeMxfp4:
    """The routed experts of MXFP4 records: `__call__` as MoeGemv's (decode), `grouped` as
    MoeGrouped's (prefill: per-row outputs, unweighted). Decode: block_n rows of each projection
    per program (gate_up: block_n of gate and of up), `groups` groups of 32 inputs per loop step,
    one lane per row and group (block_n * groups / 32 warps; gate_up twice that). Prefill: tiles of
    block_m tokens times prefill_block_n rows, `groups` groups a step, `stages` steps' loads in
    flight, num_warps warps."""

    def __init__(self, layout: RecordLayout, act: Swiglu = SILU, block_n: int | None = None, groups: int = 4,
                 block_m: int = 64, prefill_block_n: int | None = None, num_warps: int = 4, stages: int = 3):
        if layout.scheme != "mxfp4":
            raise ValueError(f"MoeMxfp4 computes MXFP4 records, not {layout.scheme} ones")
        if layout.hidden_size % MXFP4_GROUP or layout.intermediate_size % MXFP4_GROUP:
            raise ValueError(f"MXFP4 rows are whole groups of {MXFP4_GROUP}: hidden {layout.hidden_size}, "
                             f"intermediate {layout.intermediate_size}")
        self.layout, self.act = layout, act
        seg = {s.name: s for s in layout.segments}

        def offsets(proj: str) -> tuple[int, int, int]:
            bias = seg[f"{proj}.bias"].offset // 2 if layout.with_bias else 0
            # codes in words of the pool's int32 view (segments start 256-byte aligned)
            return seg[f"{proj}.blocks"].offset // 4, seg[f"{proj}.scales"].offset, bias

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        # decode rows a program: 16 measured fastest on the H100 at gpt-oss-120b's shape (36 / 50 us
        # at k = 1 / 4 against 40 / 56 with 32: EXPERIMENTS 93); the interpreter takes fewer programs
        self.block_n, self.groups, self.block_m = block_n or (32 if INTERPRETED else 16), groups, block_m
        # the interpreter runs each program as a Python loop pass: fewer, larger programs there
        self.prefill_block_n = prefill_block_n or (64 if INTERPRETED else 32)
        self.num_warps, self.stages = num_warps, stages
        # Triton 3.6's interpreter multiplies 16-bit dots wrongly: there the fp16 values are multiplied
        # as fp32 (the same values, so the same products)
        self.dot = tl.float32 if INTERPRETED else tl.float16

    def _records(self, pool: torch.Tensor) -> tuple:
        """The pool's int32 (codes), uint8 (scales) and bf16 (biases) views, then record size in bytes and words."""
        return pool.view(torch.int32), pool, pool.view(torch.bfloat16), self.layout.record_size, self.layout.record_size // 4

    def __call__(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                 residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], pool [S, record_size] uint8, slots and weights [T, k] -> y [T, H] fp32 (or into
        `out`): the weighted expert sum, plus `residual` if given."""
        L = self.layout
        T, k = slots.shape
        H, I = L.hidden_size, L.intermediate_size
        assert x.shape == (T, H) and weights.shape == (T, k) and pool.shape[1] == L.record_size
        slots, weights = slots.contiguous(), weights.contiguous()
        codes, scales, halves, size, words = self._records(pool)
        meta = dict(GROUP=MXFP4_GROUP, GROUPS=self.groups, BLOCK_N=self.block_n, STAGES=self.stages, HAS_BIAS=L.with_bias)
        warps = max(1, self.block_n * self.groups // 32)
        # one program per (token, expert) pair and block of rows: every expert's rows in programs of
        # their own (a token's k experts summed by one program would leave most SMs idle at one token)
        h = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
        _gate_up_rows_kernel[(T * k, triton.cdiv(I, self.block_n))](
            x.float().contiguous(), slots, codes, scales, halves, h, size, words, *self.gate_up,
            float(self.act.limit or 0.0), float(self.act.alpha), H=H, I=I, K_ROUTED=k,
            CLAMPED=self.act.limit is not None, num_warps=2 * warps, **meta)
        y_pairs = torch.empty(T * k, H, device=x.device, dtype=torch.float32)
        _down_rows_kernel[(T * k, triton.cdiv(H, self.block_n))](
            h, slots, weights, codes, scales, halves, y_pairs, size, words, *self.down, H=H, I=I, num_warps=warps,
            **meta)
        y = torch.empty(T, H, device=x.device, dtype=torch.float32) if out is None else out
        block = min(1024, triton.next_power_of_2(H))
        _sum_pairs_kernel[(T, triton.cdiv(H, block))](y_pairs, y if residual is None else residual, y, H=H, K_ROUTED=k,
                                                      BLOCK=block, HAS_RESIDUAL=residual is not None)
        return y

    def grouped(self, x_sorted: torch.Tensor, pool: torch.Tensor, slots: list[int], counts: list[int]) -> torch.Tensor:
        """x_sorted [M, H] (rows grouped by expert, in the order of `slots`), each expert's slot and
        row count -> y_sorted [M, H] fp32, unweighted: each expert's codes read once per block_m rows.
        The tensor cores multiply fp16 inputs (x_sorted and h rounded to fp16: |values| up to 65504)."""
        L = self.layout
        H, I = L.hidden_size, L.intermediate_size
        assert sum(counts) == x_sorted.shape[0] and x_sorted.shape[1] == H
        tile_slot, tile_row, tile_end = expert_tiles(slots, counts, self.block_m, x_sorted.device)
        bn = self.prefill_block_n
        meta = dict(H=H, I=I, BLOCK_M=self.block_m, BLOCK_N=bn, GROUP=MXFP4_GROUP, GROUPS=self.groups,
                    STAGES=self.stages, DOT=self.dot, HAS_BIAS=L.with_bias, num_warps=self.num_warps)
        records = self._records(pool)
        tiles = tile_slot.numel()
        h = torch.empty(x_sorted.shape[0], I, device=x_sorted.device, dtype=torch.float16)
        _gate_up_kernel[(tiles, triton.cdiv(I, bn))](
            x_sorted.to(torch.float16).contiguous(), tile_slot, tile_row, tile_end, *records[:3], h, *records[3:],
            *self.gate_up, float(self.act.limit or 0.0), float(self.act.alpha), CLAMPED=self.act.limit is not None,
            **meta)
        y = torch.empty(x_sorted.shape[0], H, device=x_sorted.device, dtype=torch.float32)
        _down_kernel[(tiles, triton.cdiv(H, bn))](h, tile_slot, tile_row, tile_end, *records[:3], y, *records[3:],
                                                  *self.down, **meta)
        return y


def mxfp4_reference(layout: RecordLayout, act: Swiglu, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
    """One expert of an MXFP4 record on x [T, H], in plain PyTorch (fp32)."""
    return swiglu_expert(x.float(), *layout.weights(record, torch.float32), act, layout.biases(record, torch.float32))
