"""Per-head zero-centred RMSNorm then partial NeoX rotary, in one launch per tensor:

  n = rmsnorm(x_h) * (1 + w)                              over each head's d values
  out[:rot] = n[:rot] * cos + rotate_half(n[:rot]) * sin  rotate_half(a) = [-a[rot/2:], a[:rot/2]]
  out[rot:] = n[rot:]

Reference: `apply_rotary(norm(x), cos, sin)` (layers/rotary.py, layers/norm.py), the q and k path
of GatedAttention. The eager code rounds to the model dtype after the norm, after each product
and after the sum (cos and sin too); the kernel rounds at the same places, so at 16 bits it
gives the eager values, not merely close ones.

x is a strided view (q sits inside the q_proj output as [q_h | gate_h] per head): one program per
(token, head) reads its d values from wherever they are. Each program loads its row twice, once in
order and once in rotate-half order, rather than shuffling registers. Eagerly the pair is 18
launches per tensor at 16 bits (10 for the norm, 8 for the rotary); here 1, so an attention layer
saves 34. For the 397B (q 32 heads, k 2, d = 256, rot 64): 32 and 2 programs of 2 warps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, x_stride_t, x_stride_h, HEADS, eps,
    D: tl.constexpr, ROT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    cols = tl.arange(0, D)
    half: tl.constexpr = ROT // 2
    rotary = cols < ROT
    partner = tl.where(cols < half, cols + half, tl.where(rotary, cols - half, cols))
    row = x_ptr + t * x_stride_t + h * x_stride_h
    x = tl.load(row + cols).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    n = (x * inv * (1.0 + tl.load(w_ptr + cols).to(tl.float32))).to(dt).to(tl.float32)
    p = tl.load(row + partner).to(tl.float32)
    p = (p * inv * (1.0 + tl.load(w_ptr + partner).to(tl.float32))).to(dt).to(tl.float32)
    p = tl.where(cols < half, -p, p)
    c = tl.load(cos_ptr + t * ROT + cols, mask=rotary, other=1.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + t * ROT + cols, mask=rotary, other=0.0).to(dt).to(tl.float32)
    out = tl.where(rotary, (n * c).to(dt).to(tl.float32) + (p * s).to(dt).to(tl.float32), n)
    tl.store(out_ptr + (t * HEADS + h) * D + cols, out.to(dt))


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, heads, d] (any strides, unit stride along d; d a power of two), weight [d] (the w of
    1 + w), cos / sin [T, rot] fp32 -> [T, heads, d] contiguous, in x's dtype."""
    T, heads, D = x.shape
    rot = cos.shape[-1]
    if x.stride(-1) != 1 or D != triton.next_power_of_2(D) or rot > D or rot % 2:
        raise ValueError(f"norm_rope needs unit stride along a power-of-two head_dim >= rotary_dim, got {tuple(x.shape)} / {rot}")
    out = torch.empty(T, heads, D, dtype=x.dtype, device=x.device)
    _norm_rope_kernel[(T, heads)](
        x, weight, cos.contiguous(), sin.contiguous(), out, x.stride(0), x.stride(1), heads, eps,
        D=D, ROT=rot, num_warps=max(1, min(4, D // 128)),
    )
    return out
