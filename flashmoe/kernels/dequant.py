"""Dequantize one expert record into 16-bit gate_up [2I, H] and down [H, I], in one launch: the
prefill path multiplies each expert with all of its tokens, so it dequantizes once and calls the
matrix units. Reference: RecordLayout.weights (quant.dequantize)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.packed import RecordLayout


@triton.jit
def _dequant_rows(codes_ptr, halves_ptr, out_ptr, w_base, s_base, b_base, row0, K,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    rows = row0 + tl.arange(0, BLOCK_N)
    words_per_row = K // PER_WORD
    lanes = tl.arange(0, PER_WORD)
    for w0 in range(0, words_per_row, WORDS):
        wcols = w0 + tl.arange(0, WORDS)
        words = tl.load(codes_ptr + w_base + rows[:, None] * words_per_row + wcols[None, :])
        q = (words[:, :, None] >> (lanes * BITS)[None, None, :]) & ((1 << BITS) - 1)  # [N, W, codes]
        goff = rows[:, None] * (K // GROUP) + (wcols // (GROUP // PER_WORD))[None, :]
        s = tl.load(halves_ptr + s_base + goff).to(tl.float32)
        b = tl.load(halves_ptr + b_base + goff).to(tl.float32)
        w = q.to(tl.float32) * s[:, :, None] + b[:, :, None]
        cols = wcols[:, None] * PER_WORD + lanes[None, :]  # [W, codes]
        tl.store(out_ptr + rows[:, None, None] * K + cols[None, :, :], w.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["slot"])  # one compiled kernel for every slot (ints equal to 1 specialize)
def _dequant_kernel(codes_ptr, halves_ptr, slot, gate_up_ptr, down_ptr, H, I, record_words, record_halves,
                    gu_w, gu_s, gu_b, d_w, d_s, d_b,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    pid = tl.program_id(0)
    wb = slot.to(tl.int64) * record_words
    hb = slot.to(tl.int64) * record_halves
    gate_up_blocks = 2 * I // BLOCK_N
    if pid < gate_up_blocks:
        _dequant_rows(codes_ptr, halves_ptr, gate_up_ptr, wb + gu_w, hb + gu_s, hb + gu_b, pid * BLOCK_N, H,
                      BITS, GROUP, BLOCK_N, WORDS)
    else:
        _dequant_rows(codes_ptr, halves_ptr, down_ptr, wb + d_w, hb + d_s, hb + d_b, (pid - gate_up_blocks) * BLOCK_N, I,
                      BITS, GROUP, BLOCK_N, WORDS)


class Dequantizer:
    """Dequantizes records of one layout into two reusable 16-bit buffers."""

    def __init__(self, layout: RecordLayout, dtype: torch.dtype, device, block_n: int = 16, words: int = 32):
        if layout.bits == 16:
            raise ValueError("16-bit records need no dequantization")
        self.layout, self.block_n = layout, min(block_n, layout.hidden_size, layout.intermediate_size)
        H, I = layout.hidden_size, layout.intermediate_size
        per_word = 32 // layout.bits
        self.words = min(words, H // per_word, I // per_word)
        seg = {s.name: s for s in layout.segments}
        self.offsets = [
            seg[f"{p}.weight"].offset // 4 if kind == "weight" else seg[f"{p}.{kind}"].offset // 2
            for p in ("gate_up_proj", "down_proj")
            for kind in ("weight", "scales", "biases")
        ]
        self.gate_up = torch.empty(2 * I, H, dtype=dtype, device=device)
        self.down = torch.empty(H, I, dtype=dtype, device=device)

    def __call__(self, pool: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) of the record in pool[slot]; valid until the next call."""
        L = self.layout
        H, I = L.hidden_size, L.intermediate_size
        grid = ((2 * I + H) // self.block_n,)
        _dequant_kernel[grid](
            pool.view(torch.int32), pool.view(torch.bfloat16), slot, self.gate_up, self.down, H, I,
            L.record_size // 4, L.record_size // 2, *self.offsets,
            BITS=L.bits, GROUP=L.group_size, BLOCK_N=self.block_n, WORDS=self.words,
        )
        return self.gate_up, self.down
