"""Per-head RMSNorm (optional) then partial NeoX rotary, in one launch per tensor:

  n = rmsnorm(x_h) * w, or * (1 + w) zero-centred         over each head's d values (n = x_h without norm)
  out[:rot] = n[:rot] * cos + rotate_half(n[:rot]) * sin  rotate_half(a) = [-a[rot/2:], a[:rot/2]]
  out[rot:] = n[rot:]

Reference: `apply_rotary(norm(x), cos, sin)` (layers/rotary.py, layers/norm.py), the q and k path
of Attention. The eager code rounds to the model dtype after the norm (where the norm's weight
form rounds: kernels/norms.py), after each product and after the sum (cos and sin too); the kernel
rounds at the same places, so at 16 bits it gives the eager values, not merely close ones.

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

from .norms import apply_norm_weight


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, x_stride_t, x_stride_h, HEADS, eps,
    D: tl.constexpr, ROT: tl.constexpr, NORM: tl.constexpr, ZERO_CENTRED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    cols = tl.arange(0, D)
    half: tl.constexpr = ROT // 2
    rotary = cols < ROT
    partner = tl.where(cols < half, cols + half, tl.where(rotary, cols - half, cols))
    row = x_ptr + t * x_stride_t + h * x_stride_h
    n = tl.load(row + cols).to(tl.float32)
    p = tl.load(row + partner).to(tl.float32)
    if NORM:
        inv = tl.rsqrt(tl.sum(n * n, axis=0) / D + eps)
        n = apply_norm_weight(n * inv, w_ptr, cols, cols < D, ZERO_CENTRED, dt).to(tl.float32)
        p = apply_norm_weight(p * inv, w_ptr, partner, cols < D, ZERO_CENTRED, dt).to(tl.float32)
    p = tl.where(cols < half, -p, p)
    c = tl.load(cos_ptr + t * ROT + cols, mask=rotary, other=1.0).to(dt).to(tl.float32)
    s = tl.load(sin_ptr + t * ROT + cols, mask=rotary, other=0.0).to(dt).to(tl.float32)
    out = tl.where(rotary, (n * c).to(dt).to(tl.float32) + (p * s).to(dt).to(tl.float32), n)
    tl.store(out_ptr + (t * HEADS + h) * D + cols, out.to(dt))


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
              zero_centred: bool) -> torch.Tensor:
    """x [T, heads, d] (any strides, unit stride along d; d a power of two), the norm's weight [d]
    (the w of 1 + w where zero-centred; None: no norm, the rotary alone), cos / sin [T, rot] fp32
    -> [T, heads, d] contiguous, in x's dtype."""
    T, heads, D = x.shape
    rot = cos.shape[-1]
    if x.stride(-1) != 1 or D != triton.next_power_of_2(D) or rot > D or rot % 2:
        raise ValueError(f"norm_rope needs unit stride along a power-of-two head_dim >= rotary_dim, got {tuple(x.shape)} / {rot}")
    out = torch.empty(T, heads, D, dtype=x.dtype, device=x.device)
    _norm_rope_kernel[(T, heads)](
        x, x if weight is None else weight, cos.contiguous(), sin.contiguous(), out, x.stride(0), x.stride(1), heads, eps,
        D=D, ROT=rot, NORM=weight is not None, ZERO_CENTRED=zero_centred, num_warps=max(1, min(4, D // 128)),
    )
    return out
