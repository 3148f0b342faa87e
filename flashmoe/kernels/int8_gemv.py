"""int8-weight x 16-bit-activation GEMV for decode: y [1, N] = (x [1, K] @ q [N, K]^T) * scale [N],
for one row of x (decode, with the resident dense projections with `--dense-bits 8`).

The codes are read as int32 words, 4 codes each, and become fp32 by one AND each (kernels/codes.py)
instead of an int-to-float conversion: at a quarter of the FMA rate on Hopper, the conversions bound
the first version of this kernel to 14-59% of the copy rate on the 397B's projections (docs/
EXPERIMENTS.md entry 37). The mask reads unsigned codes, so each word is first flipped to
u = q + 128 (one XOR per 4 codes) and the row's sum loses 128 * sum(x):
  sum_k q_k x_k = sum_k u_k x_k - 128 * sum_k x_k
with sum(x) summed from the inputs each lane loads anyway. The scale is symmetric and per output
channel, so it waits for the epilogue.

One program owns BLOCK_N rows; each warp reads 128 consecutive words of every row (one 16-byte load
per lane and row) and holds all the block's rows, so each input value loaded serves every row, and
each lane keeps its own accumulators until one reduction at the end. `int8_linear_reference` is the
plain PyTorch definition the kernel is tested against.

For the shared expert's down projection it also takes the SwiGLU before it (in the input's layout)
and the gated residual add after it (in the epilogue): five elementwise launches fewer per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codes import TWO_POW_64, TWO_POW_M64, after_previous_kernel, code_value, layout_x, position_scale, use_pdl
from .shared_expert import gated_add

SIGN_BITS = tl.constexpr(-2139062144)  # 0x80808080: flips each code's sign bit, q -> q + 128


@triton.jit
def _int8_gemv_kernel(
    xp_ptr, codes_ptr, scale_ptr, shared_gate_ptr, residual_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
):
    W: tl.constexpr = K // 4
    STEPS: tl.constexpr = (W + BLOCK_W - 1) // BLOCK_W
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N are clamped to the last one rather than masked, so the hot loads carry no row
    # mask; their results are never stored.
    rows = codes_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * W
    w = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    xs = tl.zeros([BLOCK_W], dtype=tl.float32)
    nxt = tl.load(rows + w[None, :], mask=w[None, :] < W, other=SIGN_BITS)  # masked words read as u = 0
    for st in tl.static_range(STEPS):
        words = nxt ^ SIGN_BITS
        if st + 1 < STEPS:  # the next block's codes go out before this one's arithmetic
            cols = (st + 1) * BLOCK_W + w
            nxt = tl.load(rows + cols[None, :], mask=cols[None, :] < W, other=SIGN_BITS)
        if st == 0:
            after_previous_kernel(PDL)  # xp
        cols = st * BLOCK_W + w
        for p in tl.static_range(4):
            x = tl.load(xp_ptr + p * W + cols, mask=cols < W, other=0.0)
            acc += code_value(words, p, 8) * x[None, :]
            xs += x * (TWO_POW_M64 / position_scale(p, 8))  # x * 2^-64
    total = tl.sum(acc, axis=1) - 128.0 * tl.sum(xs, axis=0)
    dt = y_ptr.dtype.element_ty
    y = total * TWO_POW_64 * tl.load(scale_ptr + tl.minimum(n, N - 1))
    if GATED:  # the shared expert's gated residual add (kernels/shared_expert.py), on y as rounded eagerly;
        # its inputs come from kernels before the previous one: ready after the wait above
        residual = tl.load(residual_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        y = gated_add(residual, tl.load(shared_gate_ptr).to(tl.float32), y.to(dt).to(tl.float32), dt)
    tl.store(y_ptr + n, y.to(dt), mask=n < N)


def fits(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether int8_gemv takes these: one row of x (decode; prefill's rows go to a library matmul),
    and codes readable as aligned int32 words."""
    return x.ndim == 2 and x.shape[0] == 1 and q.ndim == 2 and q.shape[1] % 4 == 0 and q.data_ptr() % 16 == 0


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_n: int = 8, num_warps: int = 2, *,
              up: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (bf16, fp16 or fp32), q int8 [N, K] contiguous with K a multiple of 4,
    scale fp32 [N] -> y = (x @ q^T) * scale as [1, N] in x.dtype, accumulated in fp32. Any N.

    The shared expert's down projection fused (kernels/shared_expert.py): given `up` [1, K], the
    input is silu(x) * up; given `shared_gate` [1, 1] and `residual` [1, N] (both or neither), the
    result is residual + sigmoid(shared_gate) * y. All in x.dtype."""
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"int8_gemv takes x of shape [1, K], got {tuple(x.shape)}")
    K = x.shape[1]
    N = q.shape[0]
    if q.dtype != torch.int8 or q.shape != (N, K) or not q.is_contiguous():
        raise ValueError(f"q must be a contiguous int8 [N, {K}] tensor, got {q.dtype} {tuple(q.shape)}")
    if not fits(x, q):
        raise ValueError(f"q is read as int32 words: K ({K}) must be a multiple of 4 and q 16-byte aligned")
    if scale.dtype != torch.float32 or scale.shape != (N,):
        raise ValueError(f"scale must be fp32 [{N}], got {scale.dtype} {tuple(scale.shape)}")
    gated = shared_gate is not None
    if gated != (residual is not None):
        raise ValueError("the gated residual add takes both shared_gate and residual")
    if gated and (shared_gate.shape != (1, 1) or residual.shape != (1, N) or shared_gate.dtype != x.dtype
                  or residual.dtype != x.dtype):
        raise ValueError(f"shared_gate must be [1, 1] and residual [1, {N}], in {x.dtype}, got "
                         f"{tuple(shared_gate.shape)} {shared_gate.dtype}, {tuple(residual.shape)} {residual.dtype}")
    pdl = use_pdl(x)
    xp = layout_x(x.contiguous(), 8, pdl, up=None if up is None else up.contiguous())
    W = K // 4
    warps = max(1, min(num_warps, triton.next_power_of_2(W) // 128))  # each warp reads 128 words of a row
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    # ungated, y stands in for the pointers the kernel never reads
    _int8_gemv_kernel[(triton.cdiv(N, block_n),)](
        xp, q.view(torch.int32), scale, shared_gate if gated else y, residual.contiguous() if gated else y, y, N, K,
        BLOCK_N=block_n, BLOCK_W=min(128 * warps, triton.next_power_of_2(W)), GATED=gated, PDL=pdl,
        num_warps=warps, launch_pdl=pdl,
    )
    return y


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same function in plain PyTorch, in fp32: [M, N]."""
    return (x.float() @ q.float().t()) * scale
