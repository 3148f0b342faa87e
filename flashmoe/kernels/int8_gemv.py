"""int8-weight x 16-bit-activation GEMV for decode: y [M, N] = (x [M, K] @ q [N, K]^T) * scale [N],
for M = 1..16 rows of x (the resident dense projections with `--dense-bits 8`).

One program owns BLOCK_N weight rows and walks K in BLOCK_K steps: each step loads a [BLOCK_N,
BLOCK_K] int8 tile (rows contiguous along K: wide coalesced loads), converts it to fp32 and
multiplies it with all M rows of x at once, so every weight byte is read from memory once whatever M
is. The per-row scale is symmetric and per output channel, so it waits for the epilogue: the inner
loop is one conversion and one multiply-add per weight. `int8_linear_reference` is the plain
PyTorch definition the kernel is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # beyond this the caller dequantizes on the fly and uses a library matmul (compute-bound)


@triton.jit
def _int8_gemv_kernel(
    x_ptr, q_ptr, scale_ptr, y_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    # Rows past N (weights) or M (x) are clamped to the last one rather than masked, so the hot
    # loads carry no mask; their results are never stored.
    n_load = tl.minimum(n, N - 1).to(tl.int64)
    m_load = tl.minimum(m, M - 1).to(tl.int64)
    # Pointers built directly in the [M, N, K] product's layout: broadcasting needs no conversions.
    w_rows = q_ptr + n_load[None, :, None] * K
    x_rows = x_ptr + m_load[:, None, None] * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)[None, None, :]
        if EVEN_K:
            w = tl.load(w_rows + k)
            x = tl.load(x_rows + k)
        else:
            w = tl.load(w_rows + k, mask=k < K, other=0)
            x = tl.load(x_rows + k, mask=k < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
    scale = tl.load(scale_ptr + n_load[None, :])
    mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(y_ptr + m[:, None] * N + n[None, :], (acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def int8_gemv(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_n: int = 2, block_k: int = 1024, num_warps: int = 1
) -> torch.Tensor:
    """x [M, K] (M <= 16; bf16, fp16 or fp32), q int8 [N, K] contiguous, scale fp32 [N]
    -> (x @ q^T) * scale as [M, N] in x.dtype, accumulated in fp32. Any N and K."""
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"int8_gemv takes x of shape [M, K] with 1 <= M <= {MAX_ROWS}, got {tuple(x.shape)}")
    M, K = x.shape
    N = q.shape[0]
    if q.dtype != torch.int8 or q.shape != (N, K) or not q.is_contiguous():
        raise ValueError(f"q must be a contiguous int8 [N, {K}] tensor, got {q.dtype} {tuple(q.shape)}")
    if scale.dtype != torch.float32 or scale.shape != (N,):
        raise ValueError(f"scale must be fp32 [{N}], got {scale.dtype} {tuple(scale.shape)}")
    block_m = triton.next_power_of_2(M)
    # The K step shrinks as rows grow, keeping the per-step product (registers) that of one row.
    block_k = min(max(32, block_k // block_m), triton.next_power_of_2(K))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _int8_gemv_kernel[(triton.cdiv(N, block_n),)](
        x.contiguous(), q, scale, y, M, N, K,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=num_warps,
    )
    return y


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same function in plain PyTorch, in fp32: [M, N]."""
    return (x.float() @ q.float().t()) * scale
