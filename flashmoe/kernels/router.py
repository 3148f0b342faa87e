"""The MoE router's decision for [T, E] logits, every rule of moe/routing.py, one program per token:

- softmax: probabilities in fp32, the top k in descending order, renormalised over the k (norm_topk);
- sigmoid: scores in fp32, chosen by score + correction bias, among the topk_group best of n_group
  groups (a group's merit is the sum of its two best biased scores), weighted by the unbiased
  scores, renormalised (norm_topk), times the routed scaling factor.
Weights are cast to the logits' dtype.

Reference: `route_reference` (moe/routing.py). The same operations on the same fp32 values, so the
ids are the same and the weights agree to fp32 rounding (sums in another order); of tied scores
the lowest expert id is taken, where torch.topk leaves the order unspecified.

Each selection is one max-reduction over packed int64 keys, (order bits of the score << 32) |
(B - 1 - id) with B = E rounded up to a power of two. The order bits are the fp32 bit pattern with
the other bits flipped for negative values (biased sigmoid scores can be negative), which orders
as a signed integer exactly as the floats order; of equal scores the lower id wins. Groups: the
keys as [n_group, E / n_group], two max-reductions per group. For the 397B (E = 512, k = 10) a
token is one program of 4 warps; no host sync and outputs of fixed shape, so it runs inside the
decode graph. Eagerly the softmax rule is 5 launches (softmax, topk, sum, divide, cast), the
grouped sigmoid rule about 20; here 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..moe.routing import Routing

_NONE = tl.constexpr(-(2**62))  # below every packed key: padding, experts of groups left out, experts taken


@triton.jit
def _order_bits(x):
    """fp32 -> int64 that orders as the floats do (for negative floats, the non-sign bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _router_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, E, K, stride, scaling,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    live = e < E
    logits = tl.load(logits_ptr + t * stride + e, mask=live, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
        choice = scores + tl.load(bias_ptr + e, mask=live, other=0.0).to(tl.float32) if HAS_BIAS else scores
    else:
        num = tl.exp(logits - tl.max(logits, axis=0))
        scores = num / tl.sum(num, axis=0)
        choice = scores
    keys = tl.where(live, (_order_bits(choice) << 32) | (BLOCK_E - 1 - e), _NONE)
    if N_GROUP > 1:
        # route() runs groups only where E == BLOCK_E: no padding inside a group
        grouped = tl.reshape(keys, [N_GROUP, BLOCK_E // N_GROUP])
        values = tl.reshape(choice, [N_GROUP, BLOCK_E // N_GROUP])
        first = grouped == tl.max(grouped, axis=1)[:, None]  # each group's best expert (the lower id of ties)
        merit = tl.max(values, axis=1) + tl.max(tl.where(first, float("-inf"), values), axis=1)
        g = tl.arange(0, N_GROUP)
        group_keys = (_order_bits(merit) << 32) | (N_GROUP - 1 - g)
        kept = tl.zeros([N_GROUP], dtype=tl.int1)
        for _ in range(TOPK_GROUP):
            top = tl.max(group_keys, axis=0)
            kept = kept | (group_keys == top)
            group_keys = tl.where(group_keys == top, _NONE, group_keys)
        keys = tl.reshape(tl.where(kept[:, None], grouped, _NONE), [BLOCK_E])
    slots = tl.arange(0, BLOCK_K)
    top = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for i in range(K):
        best = tl.max(keys, axis=0)
        chosen = BLOCK_E - 1 - (best & (BLOCK_E - 1))
        weight = tl.sum(tl.where(e == chosen, scores, 0.0), axis=0)
        top = tl.where(slots == i, weight, top)
        ids = tl.where(slots == i, chosen, ids)
        keys = tl.where(e == chosen, _NONE, keys)
    if NORM:
        top = top / (tl.sum(top, axis=0) + (1e-20 if SIGMOID else 0.0))
    top = top * scaling
    tl.store(weights_ptr + t * K + slots, top.to(weights_ptr.dtype.element_ty), mask=slots < K)
    tl.store(ids_ptr + t * K + slots, ids, mask=slots < K)


def route(logits: torch.Tensor, k: int, rule: Routing, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (unit column stride; a view into the fused in_proj output is fine), k <= E, the
    rule's correction bias [E] where it has one -> (weights [T, k] in logits' dtype, ids [T, k]
    int64), highest choice first."""
    T, E = logits.shape
    if logits.stride(-1) != 1 or not 1 <= k <= E:
        raise ValueError(f"route needs [T, E] logits with unit column stride and 1 <= k <= E, got {tuple(logits.shape)}, k={k}")
    if rule.n_group > 1 and E != triton.next_power_of_2(E):
        raise ValueError(f"grouped routing runs on a power-of-two number of experts, not {E}")
    if rule.correction_bias != (bias is not None):
        raise ValueError("the correction bias is given exactly when the rule has one")
    weights = torch.empty(T, k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    BLOCK_E = triton.next_power_of_2(E)
    _router_kernel[(T,)](
        logits, logits if bias is None else bias, weights, ids, E, k, logits.stride(0), rule.scaling,
        SIGMOID=rule.scoring == "sigmoid", HAS_BIAS=bias is not None, NORM=rule.norm_topk, N_GROUP=rule.n_group,
        TOPK_GROUP=rule.topk_group, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(k),
        num_warps=max(1, min(4, BLOCK_E // 128)),
    )
    return weights, ids
