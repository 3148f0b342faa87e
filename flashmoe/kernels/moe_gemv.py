"""Gathered routed experts for decode: each token's k experts, read from their cache slots by index,
dequantized on the fly and multiplied, SwiGLU in between, weighted sum at the end.

Quantized dot products use the bias-sum trick per group of G weights:
  sum_i (q_i * s + b) x_i = s * sum_i q_i x_i + b * sum_i x_i
The record layout is docs/FORMAT.md's; the pool is one uint8 tensor [slots, record_size] viewed as
int32 (codes) and bfloat16 (scales, weights). A slot v addresses pool.data_ptr() + v * record_size
in 64-bit arithmetic, unchecked: it may be negative or past the pool (mapped host memory).
`moe_gemv_reference` is the plain PyTorch definition the kernels are tested against.

Quantized records (v4: 2-, 4- and 8-bit), four launches:

  layout_xq: grid (tokens, H / 1024)       -> x in 16-bit fixed point per group, paired for dp2a
  gate_up:   grid (tokens * k, I / BLOCK_N) -> h [tokens * k, I] = w_j * silu(gate . x) * (up . x)
  layout_xq: grid (tokens * k, I / 1024)   -> h the same way
  down:      grid (tokens, H / BLOCK_N)     -> y [tokens, H] = sum_j down_j . h_j (+ residual)

- Integer dot products, two codes per instruction (kernels/codes.py): each group of inputs becomes
  int16 with its own scale, a word's codes split into byte planes, and dp2a multiplies two codes
  by two inputs and accumulates in int32, exactly; per group, s * s_x * sum + b * sum(x). The
  inputs' rounding to 16 bits per group is the only change to the reference's function (relative
  error ~1e-4 of the output, where v3's fp32 products were exact to 3e-7): 4-bit gate_up issues 1.5
  instructions per weight, v3 3.1 (scripts/sass_count.py), which left v3 issue-bound (entry 41 of
  docs/EXPERIMENTS.md).
- Tiles [groups, experts, rows, words of a group]: each warp reads 128 consecutive words of every
  row of its block (one 16-byte load per lane and row) and holds all the block's rows in registers,
  so each input serves every row, and the inputs land in the lanes that use them without a
  shared-memory layout conversion (`MoeGemv.tile_blocks`). One accumulator per row and lane.
- K loops unrolled with the next block's loads issued before the current block's arithmetic;
  down runs two experts at a time (one per warp) where its rows fit one warp. Each lane
  accumulates its experts in routing order and the lanes are reduced once at the end: a fixed
  order, deterministic, no atomics in the sums. The routing weight is applied to h by gate_up.
- Programmatic dependent launch on Hopper (`pdl`): each kernel's programs start while the previous
  kernel finishes (gate_up's and down's issue their first codes loads) and wait for its output only then.

Measured (H200, docs/EXPERIMENTS.md entry 47, 4-bit, 10 experts, 70.8 MB): see there; v3 (fp32
products by the AND-mask trick, codes.py code_value) took 27.4-29.0 us, 58-61% of the copy rate.

16-bit records, two launches (93% of the copy rate already):

  gate_up_swiglu: grid (tokens * k, I / BLOCK_N) -> h [tokens * k, I] = silu(gate . x) * (up . x)
  down_sum:       grid (tokens, H / BLOCK_N)     -> y [tokens, H]    = sum_j w_j * down_j . h_j
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu, swiglu_expert
from . import INTERPRETED
from .codes import after_previous_kernel, byte_plane, dp2a, layout_xq, use_pdl


@triton.jit
def record_bases(slot, record_words, record_halves, w_off, s_off, b_off, BITS: tl.constexpr):
    """Element offsets of a slot's weights (int32 codes, or bf16 weights at 16 bits), scales and
    biases, in the pool's int32 / bf16 views."""
    if BITS == 16:
        w = slot * record_halves + w_off
    else:
        w = slot * record_words + w_off
    return w, slot * record_halves + s_off, slot * record_halves + b_off


@triton.jit
def expert_act(gate, up, limit, alpha, CLAMPED: tl.constexpr):
    """A routed expert's activation (layers/mlp.py `Swiglu`): silu(gate) * up, or with CLAMPED
    gpt-oss's form: gate clamped above at limit, up to [-limit, limit], gate * sigmoid(alpha *
    gate) * (up + 1)."""
    if CLAMPED:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    else:
        h = gate / (1.0 + tl.exp(-gate)) * up
    return h


@triton.jit
def out_bias(halves_ptr, slot, record_halves, bias_off, rows, live=None):
    """An expert's output bias (bf16, at half-word `bias_off` of its record) for `rows`, as fp32
    (0 where not `live`)."""
    at = halves_ptr + slot * record_halves + bias_off + rows
    if live is None:
        b = tl.load(at)
    else:
        b = tl.load(at, mask=live, other=0.0)
    return b.to(tl.float32)


@triton.jit
def _dot_rows(
    x_ptr, halves_ptr, w_base, rows, K, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """sum_k W[rows, k] * x[k] for one expert's [N, K] bf16 projection, in fp32 -> [BLOCK_N]."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols).to(tl.float32)
        w = tl.load(halves_ptr + w_base + rows[:, None] * K + cols[None, :]).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, halves_ptr, slots_ptr, h_ptr, H, I, record_halves, w_off, bias_off, limit, alpha,
    K_ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr,
):
    pair = tl.program_id(0)  # token * K_ROUTED + j
    token = pair // K_ROUTED
    slot = tl.load(slots_ptr + pair).to(tl.int64)
    w = slot * record_halves + w_off
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = x_ptr + token * H
    gate = _dot_rows(x, halves_ptr, w, rows, H, BLOCK_K, BLOCK_N)
    up = _dot_rows(x, halves_ptr, w, rows + I, H, BLOCK_K, BLOCK_N)
    if HAS_BIAS:
        gate += out_bias(halves_ptr, slot, record_halves, bias_off, rows)
        up += out_bias(halves_ptr, slot, record_halves, bias_off, rows + I)
    tl.store(h_ptr + pair * I + rows, expert_act(gate, up, limit, alpha, CLAMPED))


@triton.jit
def _down_sum_kernel(
    h_ptr, halves_ptr, slots_ptr, weights_ptr, residual_ptr, y_ptr, H, I, record_halves, w_off, bias_off,
    K_ROUTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(K_ROUTED):  # experts summed in routing order inside one program: deterministic
        pair = token * K_ROUTED + j
        slot = tl.load(slots_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        y = _dot_rows(h_ptr + pair * I, halves_ptr, slot * record_halves + w_off, rows, I, BLOCK_K, BLOCK_N)
        if HAS_BIAS:
            y += out_bias(halves_ptr, slot, record_halves, bias_off, rows)
        acc += weight * y
    if HAS_RESIDUAL:  # the layer's residual add, fused: y = residual + routed sum
        acc += tl.load(residual_ptr + token * H + rows).to(tl.float32)
    tl.store(y_ptr + token * H + rows, acc.to(y_ptr.dtype.element_ty))


# v4 (see the module docstring). Tiles [NGB groups, E experts, R rows, WPG words of a group].
@triton.jit
def _load_block(codes_ptr, halves_ptr, slots_ptr, pairs, live, rows, record_words, record_halves, w_off, s_off, b_off,
                g0: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NGB: tl.constexpr):
    """Codes [NGB, E, R, WPG] and scales, biases [NGB, E, R] of groups g0 .. g0 + NGB of the rows of
    the experts `pairs` [E] (the ones not `live`, and groups past the row's end, read as zeros)."""
    PW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // PW
    slot = tl.load(slots_ptr + pairs, mask=live, other=0).to(tl.int64)
    w, sc, bi = record_bases(slot, record_words, record_halves, w_off, s_off, b_off, BITS)
    g = g0 + tl.arange(0, NGB)
    m = _group_mask(live, g, g0, K, GROUP, NGB)
    xoff = (g * WPG)[:, None] + tl.arange(0, WPG)[None, :]
    row_words = (rows * (K // PW))[None, None, :, None] + xoff[:, None, None, :]
    words = tl.load(codes_ptr + w[None, :, None, None] + row_words, mask=m[:, :, None, None], other=0)
    goff = (rows * (K // GROUP))[None, None, :] + g[:, None, None]
    return (words, tl.load(halves_ptr + sc[None, :, None] + goff, mask=m[:, :, None], other=0),
            tl.load(halves_ptr + bi[None, :, None] + goff, mask=m[:, :, None], other=0))


@triton.jit
def _group_mask(live, g, g0: tl.constexpr, K: tl.constexpr, GROUP: tl.constexpr, NGB: tl.constexpr):
    """[NGB, E] (or [1, E], the same for every group): the live experts' groups g that lie inside the
    row. Only a row's last block, where K is not a multiple of the block, reaches past its end (a
    compile-time fact): the full blocks keep the experts' mask alone, as before rows had tails."""
    if (g0 + NGB) * GROUP > K:
        return live[None, :] & (g < K // GROUP)[:, None]
    else:
        return live[None, :]


@triton.jit
def _accumulate(acc, block, xq_ptrs, sx_ptrs, sum_ptrs, live, g0: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr,
                GROUP: tl.constexpr, NGB: tl.constexpr, ASM: tl.constexpr):
    """acc [NGB, E, R] += s * s_x * sum(q * v) + b * sum(x) per group, the integer sum by dp2a on
    the codes' byte planes and the inputs' 16-bit pairs (kernels/codes.py layout_xq).
    xq_ptrs, sx_ptrs, sum_ptrs [E]: each expert's laid-out input, its scales and its group sums."""
    PW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // PW
    words, s, b = block
    g = g0 + tl.arange(0, NGB)
    xoff = (g * WPG)[:, None] + tl.arange(0, WPG)[None, :]
    gm = _group_mask(live, g, g0, K, GROUP, NGB)
    m = gm[:, :, None]
    dots = tl.zeros(words.shape, dtype=tl.int32)
    for j in tl.static_range(2 * (8 // BITS)):
        v = tl.load(xq_ptrs[None, :, None] + j * (K // PW) + xoff[:, None, :], mask=m, other=0)
        dots = dp2a(v[:, :, None, :], byte_plane(words, j // 2, BITS), dots, j % 2, ASM)
    # the sums over a group's words run across the lanes holding it (a shuffle per row), so that
    # one accumulator per row is held instead of one per word
    gl = g[:, None]
    sx = tl.load(sx_ptrs[None, :] + gl, mask=gm, other=0.0)
    xsum = tl.load(sum_ptrs[None, :] + gl, mask=gm, other=0.0)
    total = tl.sum(dots, axis=3).to(tl.float32)
    return acc + s.to(tl.float32) * (sx[:, :, None] * total) + b.to(tl.float32) * xsum[:, :, None]


@triton.jit
def _gate_up_v4_kernel(
    xq_ptr, sx_ptr, xsum_ptr, codes_ptr, halves_ptr, slots_ptr, weights_ptr, h_ptr,
    record_words, record_halves, w_off, s_off, b_off, bias_off, limit, alpha, H: tl.constexpr, I: tl.constexpr,
    K_ROUTED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, ASM: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
):
    pair = tl.program_id(0)
    NGB: tl.constexpr = BLOCK_K // GROUP
    STEPS: tl.constexpr = (H + BLOCK_K - 1) // BLOCK_K  # the last one masked where BLOCK_K does not divide H
    rr = tl.arange(0, 2 * BLOCK_N)
    r0 = tl.program_id(1) * BLOCK_N
    rows = r0 + rr // 2 + (rr % 2) * I  # gate and up rows interleaved: one tile, one pass over x
    pairs = pair + tl.zeros([1], dtype=tl.int32)
    live = tl.full([1], True, tl.int1)
    where = (codes_ptr, halves_ptr, slots_ptr, pairs, live, rows, record_words, record_halves, w_off, s_off, b_off)
    token = pairs // K_ROUTED
    x = (xq_ptr + token * (H // 2), sx_ptr + token * (H // GROUP), xsum_ptr + token * (H // GROUP))
    acc = tl.zeros([NGB, 1, 2 * BLOCK_N], dtype=tl.float32)
    nxt = _load_block(*where, 0, H, BITS, GROUP, NGB)
    for st in tl.static_range(STEPS):
        block = nxt
        if st + 1 < STEPS:  # the next block's loads go out before this one's arithmetic
            nxt = _load_block(*where, (st + 1) * NGB, H, BITS, GROUP, NGB)
        if st == 0:
            after_previous_kernel(PDL)  # xq
        acc = _accumulate(acc, block, *x, live, st * NGB, H, BITS, GROUP, NGB, ASM)
    gate, up = tl.split(tl.reshape(tl.sum(tl.sum(acc, axis=1), axis=0), (BLOCK_N, 2)))
    n = r0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        slot = tl.load(slots_ptr + pair).to(tl.int64)
        gate += out_bias(halves_ptr, slot, record_halves, bias_off, n)
        up += out_bias(halves_ptr, slot, record_halves, bias_off, n + I)
    # h, times the expert's routing weight (down then sums its experts unweighted)
    h = expert_act(gate, up, limit, alpha, CLAMPED) * tl.load(weights_ptr + pair).to(tl.float32)
    tl.store(h_ptr + pair * I + n, h)


@triton.jit
def _down_v4_kernel(
    hq_ptr, sh_ptr, hsum_ptr, codes_ptr, halves_ptr, slots_ptr, weights_ptr, residual_ptr, y_ptr,
    record_words, record_halves, w_off, s_off, b_off, bias_off, limit, alpha, H: tl.constexpr, I: tl.constexpr,
    K_ROUTED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EXPERTS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
):
    """EXPERTS experts at a time (one per warp when the row fits one warp), each in routing order."""
    token = tl.program_id(0)
    NGB: tl.constexpr = BLOCK_K // GROUP
    STEPS: tl.constexpr = (I + BLOCK_K - 1) // BLOCK_K
    BLOCKS: tl.constexpr = (K_ROUTED + EXPERTS - 1) // EXPERTS * STEPS
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rec = (record_words, record_halves, w_off, s_off, b_off)
    lane = tl.arange(0, EXPERTS)
    acc = tl.zeros([NGB, EXPERTS, BLOCK_N], dtype=tl.float32)
    nxt = _load_block(codes_ptr, halves_ptr, slots_ptr, token * K_ROUTED + lane, lane < K_ROUTED, rows, *rec, 0,
                      I, BITS, GROUP, NGB)
    for it in tl.static_range(BLOCKS):  # deterministic: a fixed order given by the routing order
        j = it // STEPS * EXPERTS + lane
        block = nxt
        if it + 1 < BLOCKS:  # the next block's loads go out before this one's arithmetic
            j1 = (it + 1) // STEPS * EXPERTS + lane
            nxt = _load_block(codes_ptr, halves_ptr, slots_ptr, token * K_ROUTED + j1, j1 < K_ROUTED, rows, *rec,
                              (it + 1) % STEPS * NGB, I, BITS, GROUP, NGB)
        if it == 0:
            after_previous_kernel(PDL)  # hq
        pair = token * K_ROUTED + j
        h = (hq_ptr + pair * (I // 2), sh_ptr + pair * (I // GROUP), hsum_ptr + pair * (I // GROUP))
        acc = _accumulate(acc, block, *h, j < K_ROUTED, it % STEPS * NGB, I, BITS, GROUP, NGB, ASM)
    y = tl.sum(tl.sum(acc, axis=1), axis=0)
    if HAS_BIAS:  # each expert's output bias times its routing weight (h carried the weights)
        # names of their own: the loop above made `pair` and `slot` vectors, and Triton (not its
        # interpreter) refuses a loop that would carry them as scalars
        for e in range(K_ROUTED):
            routed = token * K_ROUTED + e
            expert_slot = tl.load(slots_ptr + routed).to(tl.int64)
            y += tl.load(weights_ptr + routed).to(tl.float32) * out_bias(halves_ptr, expert_slot, record_halves, bias_off, rows)
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + token * H + rows).to(tl.float32)
    tl.store(y_ptr + token * H + rows, y.to(y_ptr.dtype.element_ty))


class MoeGemv:
    """Launch parameters for one record layout; call with a pool of expert slots.

    16-bit records: `block_n` rows per program in `block_k` steps with `num_warps`. Quantized (v4):
    `block_n` rows of gate and of up per gate_up program with `num_warps` warps, and
    `down_block_n` rows (default block_n) per down program; its K steps follow from the warps
    (`tile_blocks`), and so do the experts per down block unless `down_experts` sets them: 4 at 4
    bits (two per warp) takes down alone from 64-67% to 70-74% of the copy rate, yet the k=10 call
    slows by 0.2-0.4 us (128 registers instead of 80: fewer of down's programs can start during
    gate_up's last round; docs/EXPERIMENTS.md entry 54; capped at 96-112 registers it spills and
    slows further, entry 56), so the default stays one per warp."""

    def __init__(self, layout: RecordLayout, block_n: int | None = None, block_k: int = 1024, num_warps: int = 2,
                 down_block_n: int | None = None, pdl: bool = True, down_experts: int | None = None, act: Swiglu = SILU):
        self.layout, self.act = layout, act
        seg = {s.name: s for s in layout.segments}
        H, I = layout.hidden_size, layout.intermediate_size
        self.quantized = layout.bits != 16  # 16-bit records: plain tiles (93% of the copy rate)
        # Triton's interpreter runs each program as one more Python loop pass: up to 32 rows a
        # program there (4-8x fewer programs for the CPU tests of the runtime), the GPU's tiles elsewhere
        default_n = math.gcd(H, I, 32) if INTERPRETED else 4 if self.quantized else 8
        self.block_n = min(block_n or default_n, H, I)
        self.down_block_n = min(down_block_n or self.block_n, H) if self.quantized else self.block_n
        # 16-bit records: the largest power of two up to block_k that divides both widths (their
        # loops have no tail); quantized ones mask the tail of a row instead (_group_mask)
        self.block_k = min(block_k, H & -H, I & -I)
        if H % self.block_n or I % self.block_n or H % self.down_block_n:
            raise ValueError(f"hidden {H} and intermediate {I} must be multiples of the {self.block_n} rows of a "
                             f"program (block_n)")
        unit = 2 if layout.bits == 16 else 4  # weight offsets in elements of the view they are read through

        def offsets(proj):
            w = seg[f"{proj}.weight"].offset // unit
            s = seg[f"{proj}.scales"].offset // 2 if layout.bits != 16 else 0
            b = seg[f"{proj}.biases"].offset // 2 if layout.bits != 16 else 0
            return w, s, b

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        # the experts' output biases (gpt-oss), in half-words
        self.out_bias = tuple(seg[f"{p}.bias"].offset // 2 if layout.with_bias else 0 for p in ("gate_up_proj", "down_proj"))
        self.group = layout.group_size if layout.bits != 16 else 1
        self.num_warps = num_warps
        self.pdl = pdl
        self.down_experts = down_experts

    def tile_blocks(self, k: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """(BLOCK_K, warps) of the quantized gate_up kernel and (BLOCK_K, warps, experts at a time) of its
        down kernel for k experts per token. Each warp reads 128 consecutive words of every row of
        its block (32 lanes x one 16-byte load) and keeps all the block's rows in registers: then
        the laid-out input and the scales load straight into the lanes that use them (no
        shared-memory layout conversion) and each input value serves every row. down's rows are
        short (1024 inputs: 128 words at 4 bits, 64 at 2): the warps, or the lanes past a row's
        end, take other experts. A block holds a power of two of groups: a row that is not a
        multiple of it (Qwen3-235B's 1536, GLM-4.5-Air's 1408) ends in a masked block."""
        L = self.layout
        per_warp = 128 * (32 // L.bits)  # inputs one warp covers
        H, I = L.hidden_size, L.intermediate_size
        gu_warps = max(1, min(self.num_warps, H // per_warp))
        d_warps = max(1, min(self.num_warps, I // per_warp))  # along one row
        in_warp = max(1, per_warp // triton.next_power_of_2(I))  # experts side by side in one warp
        experts = min(triton.next_power_of_2(k), self.num_warps // d_warps * in_warp)
        d_warps = max(1, d_warps * experts // in_warp)
        if self.down_experts:  # more experts per block than warps: each warp holds several
            experts = min(triton.next_power_of_2(k), self.down_experts)
        return ((min(triton.next_power_of_2(H), per_warp * gu_warps), gu_warps),
                (min(triton.next_power_of_2(I), per_warp * d_warps), d_warps, experts))

    def __call__(
        self,
        x: torch.Tensor,
        pool: torch.Tensor,
        slots: torch.Tensor,
        weights: torch.Tensor,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, H] (bf16/fp32), pool [S, record_size] uint8, slots [T, k] int32 or int64, weights
        [T, k] in any float dtype (the kernels read them as fp32: the router's bf16 needs no cast launch)
        -> y [T, H]: the weighted expert sum (fp32), plus `residual` if given, written to `out` if given."""
        L = self.layout
        T, k = slots.shape
        H, I = L.hidden_size, L.intermediate_size
        assert x.shape == (T, H) and weights.shape == (T, k) and pool.shape[1] == L.record_size
        x, slots, weights = x.contiguous(), slots.contiguous(), weights.contiguous()
        y = torch.empty(T, H, device=x.device, dtype=torch.float32) if out is None else out
        if not self.quantized:  # 16-bit records
            halves = pool.view(torch.bfloat16)
            blocks = dict(K_ROUTED=k, BLOCK_N=self.block_n, BLOCK_K=self.block_k, HAS_BIAS=L.with_bias,
                          num_warps=self.num_warps)
            h = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
            rh = L.record_size // 2
            _gate_up_swiglu_kernel[(T * k, I // self.block_n)](x, halves, slots, h, H, I, rh, self.gate_up[0],
                                                               self.out_bias[0], *self._act_args(),
                                                               CLAMPED=self.act.limit is not None, **blocks)
            _down_sum_kernel[(T, H // self.block_n)](
                h, halves, slots, weights, y if residual is None else residual, y, H, I, rh, self.down[0],
                self.out_bias[1], HAS_RESIDUAL=residual is not None, **blocks,
            )
            return y
        # Programmatic dependent launch (Hopper on): each kernel's programs start, and read their
        # codes, while the previous kernel finishes; they wait for its output where they need it.
        pdl = self._pdl(x)
        h = self.gate_up_step(layout_xq(x, L.bits, self.group, pdl), pool, slots, weights)
        return self.down_step(layout_xq(h, L.bits, self.group, pdl), pool, slots, residual, y, weights)

    # The quantized call's two matvec launches, each from its laid-out input (codes.layout_xq's
    # triple); scripts/bench_kernels.py times each alone.
    def gate_up_step(self, xq: tuple[torch.Tensor, ...], pool: torch.Tensor, slots: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """-> h [T * k, I] fp32: each expert's w_j * silu(gate . x) * (up . x)."""
        T, k = slots.shape
        h = torch.empty(T * k, self.layout.intermediate_size, device=pool.device, dtype=torch.float32)
        (block_k, warps), _ = self.tile_blocks(k)
        _gate_up_v4_kernel[(T * k, self.layout.intermediate_size // self.block_n)](
            *xq, pool.view(torch.int32), pool.view(torch.bfloat16), slots, weights, h,
            **self._launch_meta(self.gate_up, self.out_bias[0], k, pool), BLOCK_N=self.block_n, BLOCK_K=block_k,
            num_warps=warps,
        )
        return h

    def down_step(self, hq: tuple[torch.Tensor, ...], pool: torch.Tensor, slots: torch.Tensor,
                  residual: torch.Tensor | None, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """y [T, H] = sum_j down_j . h_j (+ sum_j w_j bias_j with biased experts: `weights` then
        needed) (+ residual), h laid out."""
        T, k = slots.shape
        _, (block_k, warps, experts) = self.tile_blocks(k)
        if self.layout.with_bias and weights is None:
            raise ValueError("experts with output biases need the routing weights in down_step")
        _down_v4_kernel[(T, self.layout.hidden_size // self.down_block_n)](
            *hq, pool.view(torch.int32), pool.view(torch.bfloat16), slots, slots if weights is None else weights,
            y if residual is None else residual, y, **self._launch_meta(self.down, self.out_bias[1], k, pool),
            BLOCK_N=self.down_block_n, BLOCK_K=block_k, EXPERTS=experts, HAS_RESIDUAL=residual is not None,
            num_warps=warps,
        )
        return y

    def _act_args(self) -> tuple[float, float]:
        return float(self.act.limit or 0.0), float(self.act.alpha)

    def _pdl(self, t: torch.Tensor) -> bool:
        return self.pdl and use_pdl(t)

    def _launch_meta(self, offsets: tuple[int, int, int], bias_off: int, k: int, pool: torch.Tensor) -> dict:
        L = self.layout
        pdl = self._pdl(pool)
        limit, alpha = self._act_args()
        return dict(zip(("w_off", "s_off", "b_off"), offsets), bias_off=bias_off, limit=limit, alpha=alpha,
                    record_words=L.record_size // 4, record_halves=L.record_size // 2, K_ROUTED=k, BITS=L.bits,
                    GROUP=self.group, H=L.hidden_size, I=L.intermediate_size, PDL=pdl, ASM=not INTERPRETED,
                    HAS_BIAS=L.with_bias, CLAMPED=self.act.limit is not None, launch_pdl=pdl)


def moe_gemv_reference(layout, x, pool, slots, weights, act: Swiglu = SILU) -> torch.Tensor:
    """The same function in plain PyTorch (fp32)."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(slots.shape[0]):
        for j in range(slots.shape[1]):
            record = pool[int(slots[t, j])]
            expert = swiglu_expert(x[t : t + 1].float(), *layout.weights(record, torch.float32), act,
                                   layout.biases(record, torch.float32))
            y[t] += weights[t, j].float() * expert[0]
    return y
