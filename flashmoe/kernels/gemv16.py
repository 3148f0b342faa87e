"""16-bit-weight GEMV for decode: y [1, N] = x [1, K] @ w [N, K]^T, fp32 accumulation, for the small
projections kept 16-bit with --dense-bits 8 and fused per input (layers/fused.py): the router with
the shared expert's gate (513 x 4096 on the 397B) and DeltaNet's in_proj_b / in_proj_a (128 x 4096).

At one row cuBLAS runs these as a GEMV or a split-K GEMM plus its reduction kernel: 5-6 us for 1-4 MB
(0.2-0.8 TB/s) in the decode graph (docs/EXPERIMENTS.md entry 45). Here one program owns BLOCK_N
rows, each lane loads 16 bytes of every row per step, the next step's weights go out before this
step's arithmetic, and each lane keeps its own accumulators until one reduction at the end: one
launch, every SM busy. Larger matrices stay with cuBLAS (`fits`), which reaches the copy rate on them.

`gemv16_reference` is the plain PyTorch definition the kernel is tested against.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .codes import after_previous_kernel, use_pdl

MAX_WEIGHTS = 1 << 22  # larger matrices (8 MiB of bf16 and up) go to cuBLAS


@triton.jit
def _gemv16_kernel(x_ptr, w_ptr, y_ptr, N, row_stride, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr):
    STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * row_stride  # clamped, not masked: never stored
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    nxt = tl.load(rows + k[None, :], mask=k[None, :] < K, other=0.0)
    for st in tl.static_range(STEPS):
        w = nxt
        if st + 1 < STEPS:
            cols = (st + 1) * BLOCK_K + k
            nxt = tl.load(rows + cols[None, :], mask=cols[None, :] < K, other=0.0)
        if st == 0:
            after_previous_kernel(PDL)  # x
        cols = st * BLOCK_K + k
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n < N)


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether gemv16 takes these: one row of x, a small 16-bit weight in x's dtype whose rows are
    contiguous (a row view of a fused weight is)."""
    return (x.ndim == 2 and x.shape[0] == 1 and w.ndim == 2 and w.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and w.stride(1) == 1 and w.numel() <= MAX_WEIGHTS)


def gemv16(x: torch.Tensor, w: torch.Tensor, block_n: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [1, K], w [N, K] (both bf16 or both fp16, w's rows contiguous) -> x @ w^T [1, N] in x.dtype.
    block_n defaults to the most rows per program that still gives every SM one."""
    if not fits(x, w) or w.shape[1] != x.shape[1]:
        raise ValueError(f"gemv16 takes x [1, K] and w [N, K] in one 16-bit dtype with contiguous rows and at most "
                         f"{MAX_WEIGHTS} weights, got {tuple(x.shape)} {x.dtype} and {tuple(w.shape)} {w.dtype} "
                         f"(stride {w.stride()})")
    N, K = w.shape
    if block_n is None:
        block_n = max(1, min(8, triton.next_power_of_2(N // _sm_count(x.device) + 1) // 2))
    block_k = min(256 * num_warps, triton.next_power_of_2(K))  # 8 values (16 bytes) per lane and row
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    pdl = use_pdl(x)
    _gemv16_kernel[(triton.cdiv(N, block_n),)](x.contiguous(), w, y, N, w.stride(0), K, BLOCK_N=block_n,
                                               BLOCK_K=block_k, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return y


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def gemv16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same function in plain PyTorch, in fp32: [1, N]."""
    return x.float() @ w.float().t()
