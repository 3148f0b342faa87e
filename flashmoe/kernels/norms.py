"""RMSNorm of [T, H] rows, one program per row, optionally with the residual add before it
fused: given x and r, one launch returns s = x + r (rounded to the model dtype, as the eager
`x + h` is) and rmsnorm(s).

rmsnorm(x) = x * rsqrt(mean(x^2) + eps) in fp32, then zero-centred: * (1 + w) in fp32, cast to
x's dtype; or plain: cast to x's dtype, then * w (rounded again), the order of each reference.
Reference: the PyTorch branches of `RMSNorm.forward` and `RMSNorm.add` (layers/norm.py); the
latter is DecoderLayer's `x = x + h; h = post_attention_layernorm(x)`.

A row of the 397B (H = 4096) fits one program: 8 warps, 16 values per thread, so the sum of
squares is a single pass over registers. Eagerly a 16-bit norm is 10 launches (3 dtype
conversions, 7 elementwise and reduction ops) and the add one more; here each is one launch: per
layer (input norm, residual add and post-attention norm) 21 -> 2 launches, the final norm 10 -> 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, sum_ptr, out_ptr, H, x_stride, r_stride, eps,
    HAS_RESIDUAL: tl.constexpr, ZERO_CENTRED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the model dtype before the norm reads it: the residual stream holds that value.
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * H + cols, x, mask=mask)
    x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    out = apply_norm_weight(x * inv, w_ptr, cols, mask, ZERO_CENTRED, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * H + cols, out, mask=mask)


@triton.jit
def apply_norm_weight(normed, w_ptr, cols, mask, ZERO_CENTRED: tl.constexpr, dt: tl.constexpr):
    """The normalised fp32 values times the weight, rounded as the reference rounds -> dt."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ZERO_CENTRED:
        return (normed * (1.0 + w)).to(dt)
    return (normed.to(dt).to(tl.float32) * w).to(dt)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] as [rows, H] with unit column stride (a view where possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(x: torch.Tensor, r: torch.Tensor | None, weight: torch.Tensor, eps: float,
            zero_centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _rows(x)
    T, H = rows.shape
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    # Without a residual the kernel never touches r or the sum: any tensor stands in for them.
    res = _rows(r) if r is not None else rows
    total = torch.empty_like(out) if r is not None else out
    BLOCK = triton.next_power_of_2(H)
    _rms_norm_kernel[(T,)](
        rows, res, weight, total, out, H, rows.stride(0), res.stride(0), eps,
        HAS_RESIDUAL=r is not None, ZERO_CENTRED=zero_centred, BLOCK=BLOCK, num_warps=min(8, max(1, BLOCK // 512)),
    )
    return total.view(x.shape), out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool) -> torch.Tensor:
    """x [..., H], weight [H] (the stored w of 1 + w where zero-centred) -> rmsnorm(x) in x's dtype."""
    return _launch(x, None, weight, eps, zero_centred)[1]


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, r [..., H] of one dtype -> (s = x + r, rmsnorm(s)), both in x's dtype, in one launch."""
    return _launch(x, r, weight, eps, zero_centred)
