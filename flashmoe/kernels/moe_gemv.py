"""Gathered routed experts for decode: each token's k experts, read from their cache slots by index,
dequantized on the fly and multiplied, SwiGLU in between, weighted sum at the end. Two launches:

  gate_up_swiglu: grid (tokens * k, I / BLOCK_N) -> h [tokens * k, I] = silu(gate . x) * (up . x)
  down_sum:       grid (tokens, H / BLOCK_N)     -> y [tokens, H]    = sum_j w_j * down_j . h_j

Quantized dot products use the bias-sum trick per group of G weights:
  sum_i (q_i * s + b) x_i = s * sum_i q_i x_i + b * sum_i x_i
so the inner loop is one multiply-add per weight. The record layout is docs/FORMAT.md's; the pool
is one uint8 tensor [slots, record_size] viewed as int32 (codes) and bfloat16 (scales, weights).
`moe_gemv_reference` is the plain PyTorch definition the kernels are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout


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
def _dot_rows(
    x_ptr, codes_ptr, halves_ptr, w_base, s_base, b_base, rows, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """sum_k W[rows, k] * x[k] for one expert's [N, K] projection, in fp32 -> [BLOCK_N].

    Quantized rows are walked a block of packed words at a time, without reshapes: for each code
    position j inside a word, the j-th codes of all words meet the x values at stride 32 / BITS.
    A word never straddles two groups (GROUP >= 32 / BITS), so per word the bias-sum trick needs
    the word's group scale and bias once: s * sum_j q_j x_j + b * sum_j x_j."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if BITS == 16:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols).to(tl.float32)
            w = tl.load(halves_ptr + w_base + rows[:, None] * K + cols[None, :]).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        words_per_row = K // PER_WORD
        groups_per_row = K // GROUP
        for w0 in range(0, words_per_row, WORDS):
            wcols = w0 + tl.arange(0, WORDS)
            words = tl.load(codes_ptr + w_base + rows[:, None] * words_per_row + wcols[None, :])
            qx = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
            xsum = tl.zeros([WORDS], dtype=tl.float32)
            for j in tl.static_range(PER_WORD):
                xj = tl.load(x_ptr + wcols * PER_WORD + j).to(tl.float32)
                q = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                qx += q * xj[None, :]
                xsum += xj
            goff = rows[:, None] * groups_per_row + (wcols // (GROUP // PER_WORD))[None, :]
            s = tl.load(halves_ptr + s_base + goff).to(tl.float32)
            b = tl.load(halves_ptr + b_base + goff).to(tl.float32)
            acc += tl.sum(s * qx + b * xsum[None, :], axis=1)
    return acc


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, codes_ptr, halves_ptr, slots_ptr, h_ptr,
    H, I, record_words, record_halves, w_off, s_off, b_off,
    K_ROUTED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)  # token * K_ROUTED + j
    token = pair // K_ROUTED
    slot = tl.load(slots_ptr + pair).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w, sc, bi = record_bases(slot, record_words, record_halves, w_off, s_off, b_off, BITS)
    x = x_ptr + token * H
    gate = _dot_rows(x, codes_ptr, halves_ptr, w, sc, bi, rows, H, BITS, GROUP, BLOCK_K, BLOCK_N)
    up = _dot_rows(x, codes_ptr, halves_ptr, w, sc, bi, rows + I, H, BITS, GROUP, BLOCK_K, BLOCK_N)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + pair * I + rows, h)


@triton.jit
def _down_sum_kernel(
    h_ptr, codes_ptr, halves_ptr, slots_ptr, weights_ptr, residual_ptr, y_ptr,
    H, I, record_words, record_halves, w_off, s_off, b_off,
    K_ROUTED: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(K_ROUTED):  # experts summed in routing order inside one program: deterministic
        pair = token * K_ROUTED + j
        slot = tl.load(slots_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        w, sc, bi = record_bases(slot, record_words, record_halves, w_off, s_off, b_off, BITS)
        acc += weight * _dot_rows(
            h_ptr + pair * I, codes_ptr, halves_ptr, w, sc, bi, rows, I, BITS, GROUP, BLOCK_K, BLOCK_N
        )
    if HAS_RESIDUAL:  # the layer's residual add, fused: y = residual + routed sum
        acc += tl.load(residual_ptr + token * H + rows).to(tl.float32)
    tl.store(y_ptr + token * H + rows, acc.to(y_ptr.dtype.element_ty))


class MoeGemv:
    """Launch parameters for one record layout; call with a pool of expert slots."""

    def __init__(self, layout: RecordLayout, block_n: int = 8, block_k: int = 1024, num_warps: int = 2):
        self.layout = layout
        seg = {s.name: s for s in layout.segments}
        H, I = layout.hidden_size, layout.intermediate_size
        self.block_n = min(block_n, H, I)
        self.block_k = min(block_k, H, I)
        if H % self.block_n or I % self.block_n or H % self.block_k or I % self.block_k:
            raise ValueError(f"hidden {H} and intermediate {I} must be multiples of the kernel blocks")
        if layout.bits != 16 and self.block_k % layout.group_size:
            raise ValueError("BLOCK_K must be a multiple of the group size")
        unit = 2 if layout.bits == 16 else 4  # weight offsets in elements of the view they are read through

        def offsets(proj):
            w = seg[f"{proj}.weight"].offset // unit
            s = seg[f"{proj}.scales"].offset // 2 if layout.bits != 16 else 0
            b = seg[f"{proj}.biases"].offset // 2 if layout.bits != 16 else 0
            return w, s, b

        self.gate_up, self.down = offsets("gate_up_proj"), offsets("down_proj")
        self.group = layout.group_size if layout.bits != 16 else 1
        self.num_warps = num_warps

    def __call__(
        self,
        x: torch.Tensor,
        pool: torch.Tensor,
        slots: torch.Tensor,
        weights: torch.Tensor,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, H] (bf16/fp32), pool [S, record_size] uint8, slots [T, k] int32, weights [T, k]
        -> y [T, H]: the weighted expert sum (fp32), plus `residual` if given, written to `out` if given."""
        L = self.layout
        T, k = slots.shape
        H, I = L.hidden_size, L.intermediate_size
        assert x.shape == (T, H) and weights.shape == (T, k) and pool.shape[1] == L.record_size
        codes, halves = pool.view(torch.int32), pool.view(torch.bfloat16)
        rw, rh = L.record_size // 4, L.record_size // 2
        h = torch.empty(T * k, I, device=x.device, dtype=torch.float32)
        y = torch.empty(T, H, device=x.device, dtype=torch.float32) if out is None else out
        meta = dict(
            K_ROUTED=k, BITS=L.bits, GROUP=self.group, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            num_warps=self.num_warps,
        )
        _gate_up_swiglu_kernel[(T * k, I // self.block_n)](
            x.contiguous(), codes, halves, slots.contiguous(), h, H, I, rw, rh, *self.gate_up, **meta
        )
        _down_sum_kernel[(T, H // self.block_n)](
            h, codes, halves, slots.contiguous(), weights.contiguous(), y if residual is None else residual, y,
            H, I, rw, rh, *self.down, HAS_RESIDUAL=residual is not None, **meta
        )
        return y


def moe_gemv_reference(layout, x, pool, slots, weights) -> torch.Tensor:
    """The same function in plain PyTorch (fp32)."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(slots.shape[0]):
        for j in range(slots.shape[1]):
            gate_up, down = layout.weights(pool[int(slots[t, j])], torch.float32)
            g, u = (gate_up @ x[t].float()).chunk(2)
            y[t] += weights[t, j].float() * (down @ (torch.nn.functional.silu(g) * u))
    return y
