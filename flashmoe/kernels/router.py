"""The MoE router's decision for [T, E] logits, one program per token: softmax in fp32, the top k
in descending order, renormalised over the k (norm_topk), weights cast to the logits' dtype.

Reference: `SparseMoE.route` (layers/moe.py). The same operations on the same fp32 values, so
the ids are the same and the weights agree to fp32 rounding (sums in another order); of tied
probabilities the lowest expert id is taken, where torch.topk leaves the order unspecified.

Each of the k selections is one max-reduction over packed int64 keys, (probability bits << 32) |
(B - 1 - id) with B = E rounded up to a power of two: probabilities are >= 0, so their fp32 bit
patterns order as integers, and of equal probabilities the lower id wins. For the 397B (E = 512,
k = 10) a token is one program of 4 warps; no host sync and outputs of fixed shape, so it runs
inside the decode graph. Eagerly it is 5 launches (softmax, topk, sum, divide, cast); here 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _router_kernel(
    logits_ptr, weights_ptr, ids_ptr, E, K, stride,
    NORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + t * stride + e, mask=e < E, other=float("-inf")).to(tl.float32)
    num = tl.exp(logits - tl.max(logits, axis=0))
    probs = num / tl.sum(num, axis=0)
    keys = (probs.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - e)
    keys = tl.where(e < E, keys, -1)  # padding never wins, even against probabilities of 0
    slots = tl.arange(0, BLOCK_K)
    top = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for i in range(K):
        best = tl.max(keys, axis=0)
        chosen = BLOCK_E - 1 - (best & (BLOCK_E - 1))
        top = tl.where(slots == i, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), top)
        ids = tl.where(slots == i, chosen, ids)
        keys = tl.where(e == chosen, -1, keys)
    if NORM:
        top = top / tl.sum(top, axis=0)
    tl.store(weights_ptr + t * K + slots, top.to(weights_ptr.dtype.element_ty), mask=slots < K)
    tl.store(ids_ptr + t * K + slots, ids, mask=slots < K)


def route(logits: torch.Tensor, k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (unit column stride; a view into the fused in_proj output is fine), k <= E
    -> (weights [T, k] in logits' dtype, ids [T, k] int64), highest probability first."""
    T, E = logits.shape
    if logits.stride(-1) != 1 or not 1 <= k <= E:
        raise ValueError(f"route needs [T, E] logits with unit column stride and 1 <= k <= E, got {tuple(logits.shape)}, k={k}")
    weights = torch.empty(T, k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    BLOCK_E = triton.next_power_of_2(E)
    _router_kernel[(T,)](
        logits, weights, ids, E, k, logits.stride(0),
        NORM=norm_topk, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(k), num_warps=max(1, min(4, BLOCK_E // 128)),
    )
    return weights, ids
