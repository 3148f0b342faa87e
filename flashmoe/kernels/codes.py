"""Quantized codes multiplied without an int-to-float conversion, two ways: as fp32 by the AND-mask
trick below (int8_gemv's dense projections), and as integers against inputs in 16-bit fixed point
(`layout_xq` at the end: moe_gemv's gathered experts, twice the codes per instruction).

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


# Fixed-point inputs for integer dot products (moe_gemv's gathered experts): two codes per instruction.
#
# Each group of G inputs (the weights' quantization group) becomes int16 v = round(x / s_x) with
# s_x = max|x| / 32767, kept with its fp32 s_x and the exact fp32 sum of the group's x (the bias
# term's). A word's codes split into byte planes (plane p: (word >> BITS * p) & the code mask in
# every byte; its byte i holds code i * 8 / BITS + p), and `dp2a` multiplies two of a plane's
# bytes by two int16 inputs packed in one register and adds them to an int32: 8 codes are one
# shift, two ANDs and four dp2a at 4 bits, where the fp32 path needs eight ANDs and eight FFMAs.
# The products are exact integers; what is lost is the inputs' rounding to 16 bits per group,
# |error| <= max|x| / 65534 per input.
X_STEPS = tl.constexpr(32767.0)


@triton.jit
def dp2a(x_pair, plane, acc, HI: tl.constexpr, ASM: tl.constexpr):
    """acc + x_pair.lo16 * byte b + x_pair.hi16 * byte b + 1 of plane, b = 2 if HI else 0 (int32;
    the int16 halves signed, the bytes unsigned): PTX dp2a, one instruction; with ASM off (Triton's
    interpreter runs no PTX) the same function in integer ops."""
    if ASM:
        if HI:
            return tl.inline_asm_elementwise("dp2a.hi.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [x_pair, plane, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp2a.lo.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [x_pair, plane, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        b = 16 if HI else 0
        return acc + ((x_pair << 16) >> 16) * ((plane >> b) & 0xFF) + (x_pair >> 16) * ((plane >> (b + 8)) & 0xFF)


@triton.jit
def byte_plane(words, p: tl.constexpr, BITS: tl.constexpr):
    """Plane p of the words: byte i holds code i * 8 / BITS + p (8-bit codes: the words themselves)."""
    if BITS == 8:
        return words
    else:
        MASK: tl.constexpr = ((1 << BITS) - 1) * 0x01010101
        return (words >> (BITS * p)) & MASK


@triton.jit
def _layout_xq_kernel(x_ptr, xq_ptr, scale_ptr, H: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                      GROUPS: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the next kernel's programs may start (they read their codes first); x is the previous kernel's
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0)
    PW: tl.constexpr = 32 // BITS
    P: tl.constexpr = 8 // BITS
    WPG: tl.constexpr = GROUP // PW
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    word = (g * WPG)[:, None, None] + tl.arange(0, WPG)[None, None, :]
    j = tl.arange(0, 2 * P)[None, :, None]  # register j of a word: plane j // 2, bytes 0-1 or 2-3 (dp2a lo / hi)
    lo = j % 2 * 2 * P + j // 2  # the code in byte 2 * (j % 2) of plane j // 2; the byte after it holds lo + P
    x_lo = tl.load(x_ptr + t * H + word * PW + lo).to(tl.float32)
    x_hi = tl.load(x_ptr + t * H + word * PW + lo + P).to(tl.float32)
    top = tl.max(tl.max(tl.maximum(tl.abs(x_lo), tl.abs(x_hi)), axis=2), axis=1)
    inv = tl.where(top > 0, X_STEPS / top, 0.0)[:, None, None]
    v_lo = x_lo * inv
    v_hi = x_hi * inv
    v_lo = tl.where(v_lo >= 0, v_lo + 0.5, v_lo - 0.5).to(tl.int32)  # round half away from zero
    v_hi = tl.where(v_hi >= 0, v_hi + 0.5, v_hi - 0.5).to(tl.int32)
    tl.store(xq_ptr + t * (H // 2) + j * (H // PW) + word, (v_lo & 0xFFFF) | (v_hi << 16))
    scales = scale_ptr + t * (H // GROUP) + g  # [2, T, H / GROUP]: the scales, then the sums
    tl.store(scales, top / X_STEPS)
    tl.store(scales + tl.num_programs(0) * (H // GROUP), tl.sum(tl.sum(x_lo + x_hi, axis=2), axis=1))


def layout_xq(x: torch.Tensor, bits: int, group: int, pdl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] -> (xq [T, H / 2] int32, s_x [T, H / group], sums [T, H / group] fp32): x in 16-bit fixed
    point per group, packed in pairs for `dp2a` on byte planes of `bits`-bit codes. For word w (inputs
    w * 32 / bits ...) and register j, xq[t, j * H * bits / 32 + w] holds the inputs of plane j // 2's
    bytes 2 * (j % 2) and 2 * (j % 2) + 1. With `pdl`, launched as a dependent of the kernel before
    (which wrote x) and launching the next."""
    T, H = x.shape
    xq = torch.empty(T, H // 2, device=x.device, dtype=torch.int32)
    scales = torch.empty(2, T, H // group, device=x.device, dtype=torch.float32)  # one allocation for both
    # groups per program: up to 1024 inputs' worth, a power of two that divides the row's groups
    n = H // group
    groups = min(max(1, 1024 // group), n & -n)
    _layout_xq_kernel[(T, n // groups)](x, xq, scales, H, bits, group, groups, pdl, num_warps=4,
                                                  launch_pdl=pdl)
    return xq, scales[0], scales[1]
