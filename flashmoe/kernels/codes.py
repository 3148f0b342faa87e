"""Quantized codes as fp32 without an int-to-float conversion, shared by the GEMV kernels that read
packed codes (moe_gemv's gathered experts, int8_gemv's dense projections).

A 32-bit word holds 32 / BITS codes. The word masked to code p (at bit b = BITS * p, or taken from
the word >> 8 for the codes that would reach bit 24 and the exponent) has the bit pattern of the
fp32 q * 2^(b - 149), exactly (a denormal below bit 23): one AND per code. Multiplied by the input
laid out beforehand as x * 2^(85 - b) (`layout_x`), the FFMA's product is q * x * 2^-64 exactly,
the reference's own fp32 product at a fixed power-of-two scale that the kernel undoes once at the
end (TWO_POW_64). Inputs must stay below 2^43 in magnitude (beyond, inf); they are exact down to
2^-39. Int-to-float conversions run at a quarter of the FMA rate on Hopper: with them a GEMV of
low-bit codes is bound by conversions, not by memory.

The laid-out input xp [T, H] holds, for each code position p, the inputs of consecutive words
contiguously (xp[t, p, w] = x[t, w * 32 / BITS + p]): a warp reading 128 consecutive words of a
row then loads the inputs it needs as vectors, already in the lanes that use them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .shared_expert import silu_mul

TWO_POW_64 = tl.constexpr(18446744073709551616.0)
TWO_POW_M64 = tl.constexpr(5.421010862427522e-20)


@triton.jit
def position_scale(p, BITS: tl.constexpr):
    """2^(149 - 64 - b) for code position p read at bit b (see code_value), exactly."""
    b = tl.where(BITS * (p + 1) <= 24, BITS * p, BITS * p - 8)
    return ((149 - 64 - b + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def code_value(words, p: tl.constexpr, BITS: tl.constexpr):
    """The p-th code of every word as the fp32 whose bit pattern is the word masked to it:
    q * 2^(b - 149) exactly (denormal below bit 23)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS * (p + 1) <= 24:
        q = (words & (MASK << (BITS * p))).to(tl.float32, bitcast=True)
    else:  # read 8 bits lower
        q = ((words >> 8) & (MASK << (BITS * p - 8))).to(tl.float32, bitcast=True)
    return q


@triton.jit
def after_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch this program may start while the previous kernel runs
    (it has issued its own first loads by now): wait for that kernel's writes here. And let the
    next kernel's programs launch (they wait the same way) as this kernel's last ones start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _layout_x_kernel(x_ptr, up_ptr, xp_ptr, H: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                     SWIGLU: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the kernel that reads xp may launch now: it reads its codes while this runs
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0)
    PW: tl.constexpr = 32 // BITS
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = i < H
    x = tl.load(x_ptr + token * H + i, mask=live).to(tl.float32)
    if SWIGLU:  # x is a gate: the input is silu(x) * up
        up = tl.load(up_ptr + token * H + i, mask=live).to(tl.float32)
        x = silu_mul(x, up, x_ptr.dtype.element_ty)
    p = i % PW
    tl.store(xp_ptr + token * H + p * (H // PW) + i // PW, x * position_scale(p, BITS), mask=live)


def use_pdl(x: torch.Tensor) -> bool:
    """Programmatic dependent launch: on Hopper and later (not in Triton's interpreter)."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def layout_x(x: torch.Tensor, bits: int, pdl: bool, up: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] (H a multiple of 32 / bits) -> xp [T, H] fp32: x[t, w * 32 / bits + p] * 2^(85 - b(p))
    at [t, p * H * bits / 32 + w]. Given `up` (x's shape and dtype), silu(x) * up is laid out instead
    (kernels/shared_expert.py's SwiGLU, fused: one launch fewer before a down projection)."""
    T, H = x.shape
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"up must match x ({tuple(x.shape)} {x.dtype}), got {tuple(up.shape)} {up.dtype}")
    xp = torch.empty(T, H, device=x.device, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(H))
    _layout_x_kernel[(T, triton.cdiv(H, block))](x, x if up is None else up, xp, H, bits, block, up is not None, pdl,
                                                 num_warps=4)
    return xp
