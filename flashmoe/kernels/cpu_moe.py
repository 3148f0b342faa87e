"""The MoE half of a decoder layer for a few tokens on the CPU (a decode token, or a batch's: one
per sequence), in one numba call: the residual add and post-attention RMSNorm, the router and the
shared expert's projections (one pass over the block's fused bf16 in_proj for all the tokens),
softmax top-k routing, the routed experts straight from their packed records (cpu_experts.py's
helpers; each chosen expert read once for all the tokens that chose it), the shared expert and its
sigmoid gate, and the residual adds. The eager path does the same in ~40 PyTorch and numba calls
per layer, most of whose time on a small model is the calls themselves (EXPERIMENTS entry 83).

It computes the routed experts only when every chosen one is in the host cache: the call first
routes, then returns 0 if one of them has no slot, with the rest of the layer done (r + the
shared expert, the routing, the experts' input), and the caller adds the routed experts after
loading them.

The reference is that eager path (models/transformer.DecoderLayer: RMSNorm.add, MoEBlock.project,
route_reference, add_shared, StreamedExperts), which tests compare against.
"""

from __future__ import annotations

import functools

import numpy as np

from ..formats.packed import RecordLayout
from ..layers.mlp import Swiglu
from .cpu_experts import ROWS_PER_BLOCK, _activation, _add_weighted, _lay_out, _project, _variant, numba_jit
from .cpu_step import _gemm_bf16, _rms_norm


@numba_jit(inline="always")
def _softmax_top_k(logits, norm_topk, ids, weights):
    """ids, weights [k]: the k most probable experts of softmax(logits) in fp32, most probable first
    (torch.topk's order; ties to the lower id), their probabilities renormalised over the k where
    norm_topk (moe/routing.route_reference, softmax rule)."""
    E = logits.shape[0]
    top = logits.max()
    probs = np.empty(E, np.float32)
    total = np.float32(0.0)
    for e in range(E):
        probs[e] = np.exp(logits[e] - top)
        total += probs[e]
    chosen = np.zeros(E, np.bool_)
    picked = np.float32(0.0)
    for j in range(ids.shape[0]):
        best = -1
        for e in range(E):
            if not chosen[e] and (best < 0 or probs[e] > probs[best]):
                best = e
        chosen[best] = True
        ids[j], weights[j] = best, probs[best] / total
        picked += weights[j]
    if norm_topk:
        for j in range(ids.shape[0]):
            weights[j] /= picked


@functools.cache
def _kernel(bits: int, group: int, kind: int, with_bias: bool, limit: float, alpha: float):
    """`moe_step` for one record format and activation (constants of the closure, as in
    cpu_experts._kernel, whose arguments these are)."""

    @numba_jit()
    def moe_step(x, mixer_out, norm_weight, eps, zero_centred, w_in, w_down, gated, norm_topk, slot_of, p8, p16,
                 offs, inter, half_pow2, most, h, ids, weights, out):
        """out [T, H] = r + the MoE block of h = rms_norm(r), r = x + mixer_out [T, H]. w_in: the
        fused in_proj as bf16 bits [E (+1 gated) + 2 Is, H]: the router's rows, the shared expert's
        gate row where `gated`, then its gate_proj and up_proj rows; w_down [H, Is] (Is = 0: no
        shared expert); both read once for the T tokens. slot_of [E]: each expert's pool slot, < 0
        where it is not cached. ids, weights [T, k] get each token's chosen experts and their
        weights, h [T, H] the experts' input. Each chosen expert is read once for all the tokens
        that chose it. -> how many distinct experts it computed, or 0 where one of them is not
        cached or they are more than `most`: out then holds r + the shared expert, and the caller
        adds the routed experts."""
        T, hidden = x.shape
        E, shared, k = slot_of.shape[0], w_down.shape[1], ids.shape[1]
        residual = np.empty((T, hidden), np.float32)
        for t in range(T):
            for i in range(hidden):
                residual[t, i] = x[t, i] + mixer_out[t, i]
        _rms_norm(residual, norm_weight, eps, zero_centred, h)
        proj = np.empty((T, w_in.shape[0]), np.float32)
        _gemm_bf16(w_in, h, proj)
        for t in range(T):
            _softmax_top_k(proj[t, :E], norm_topk, ids[t], weights[t])
        # the shared expert first, then the routed ones: the eager path's order of the adds
        out[:, :] = residual
        if shared:
            first = E + 1 if gated else E
            act, y = np.empty((T, shared), np.float32), np.empty((T, hidden), np.float32)
            for t in range(T):
                for c in range(shared):
                    gate = proj[t, first + c]
                    act[t, c] = gate / (np.float32(1.0) + np.exp(-gate)) * proj[t, first + shared + c]
            _gemm_bf16(w_down, act, y)
            for t in range(T):
                scale = np.float32(1.0) / (np.float32(1.0) + np.exp(-proj[t, E])) if gated else np.float32(1.0)
                for i in range(hidden):
                    out[t, i] += scale * y[t, i]
        # the (token, choice) pairs p = t k + j, expert after expert (stable: tokens in order)
        pairs = ids.reshape(T * k)
        by_expert = np.argsort(pairs, kind="mergesort")
        distinct = 0
        for q in range(T * k):
            if slot_of[pairs[by_expert[q]]] < 0:
                return 0
            if q == 0 or pairs[by_expert[q]] != pairs[by_expert[q - 1]]:
                distinct += 1
        if distinct > most:
            return 0
        xp, xs = np.empty((T, hidden), np.float32), np.empty((T, 2 * (hidden // group)), np.float32)
        for t in range(T):
            _lay_out(h[t], bits, group, kind, xp[t], xs[t])
        gate_up, ys = np.empty((T * k, 2 * inter), np.float32), np.empty((T * k, hidden), np.float32)
        act = np.empty(inter, np.float32)
        ap, asum = np.empty((T * k, inter), np.float32), np.empty((T * k, 2 * (inter // group)), np.float32)
        bf16_buf = np.empty(1, np.uint32)
        start = 0
        while start < T * k:  # one expert: its pairs by_expert[start:end]
            end = start + 1
            while end < T * k and pairs[by_expert[end]] == pairs[by_expert[start]]:
                end += 1
            slot = slot_of[pairs[by_expert[start]]]
            rec8, rec16 = p8[slot], p16[slot]
            # a block of the record's rows for each of its tokens before the next block: read once
            for r0 in range(0, 2 * inter, ROWS_PER_BLOCK):
                for q in range(start, end):
                    p = by_expert[q]
                    _project(rec8, rec16, offs[0:3], hidden, bits, group, kind, r0, min(r0 + ROWS_PER_BLOCK, 2 * inter),
                             xp[p // k], xs[p // k], half_pow2, gate_up[p])
            for q in range(start, end):
                p = by_expert[q]
                _activation(gate_up[p], inter, rec16, offs, bits, group, kind, with_bias, limit, alpha, act, ap[p], asum[p],
                            bf16_buf)
            for r0 in range(0, hidden, ROWS_PER_BLOCK):
                for q in range(start, end):
                    p = by_expert[q]
                    _project(rec8, rec16, offs[5:8], inter, bits, group, kind, r0, min(r0 + ROWS_PER_BLOCK, hidden),
                             ap[p], asum[p], half_pow2, ys[p])
            start = end
        routed = np.empty(hidden, np.float32)
        for t in range(T):  # each token's experts summed in its routing order
            routed[:] = 0.0
            for j in range(k):
                _add_weighted(routed, weights[t, j], ys[t * k + j], p16[slot_of[ids[t, j]]], offs, with_bias, bf16_buf)
            for i in range(hidden):
                out[t, i] += routed[i]
        return distinct

    return moe_step


def moe_kernel(layout: RecordLayout, act: Swiglu):
    """The compiled `moe_step` for these records and this activation (compiled on first use)."""
    return _kernel(*_variant(layout, act))
