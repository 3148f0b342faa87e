"""The MoE half of a decoder layer for one decode token on the CPU, in one numba call: the residual
add and post-attention RMSNorm, the router and the shared expert's projections (one GEMV over the
block's fused bf16 in_proj), softmax top-k routing, the routed experts straight from their packed
records (cpu_experts.py's helpers), the shared expert and its sigmoid gate, and the residual adds.
The eager path does the same in ~40 PyTorch and numba calls per layer, most of whose time on a
small model is the calls themselves (EXPERIMENTS entry 83).

It runs only when every chosen expert is in the host cache: the call first routes, then returns
False (its output untouched) if one of them has no slot, and the caller runs the eager path.

The reference is that eager path (models/transformer.DecoderLayer: RMSNorm.add, MoEBlock.project,
route_reference, add_shared, StreamedExperts), which tests compare against.
"""

from __future__ import annotations

import functools

import numpy as np

from ..formats.packed import RecordLayout
from ..layers.mlp import Swiglu
from .cpu_experts import _activation, _add_weighted, _lay_out, _project, _variant, numba_jit
from .cpu_step import _gemv_bf16, _rms_norm


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
def _kernel(bits: int, group: int, mxfp4: bool, with_bias: bool, limit: float, alpha: float):
    """`moe_step` for one record format and activation (constants of the closure, as in
    cpu_experts._kernel, whose arguments these are)."""

    @numba_jit()
    def moe_step(x, mixer_out, norm_weight, eps, zero_centred, w_in, w_down, gated, norm_topk, slot_of, p8, p16,
                 offs, inter, half_pow2, ids, out):
        """out [1, H] = r + the MoE block of rms_norm(r), r = x + mixer_out [1, H]. w_in: the fused
        in_proj as bf16 bits [E (+1 gated) + 2 Is, H]: the router's rows, the shared expert's gate
        row where `gated`, then its gate_proj and up_proj rows; w_down [H, Is] (Is = 0: no shared
        expert). slot_of [E]: each expert's pool slot, < 0 where it is not cached. ids [k] gets the
        chosen experts. -> False, out untouched, where one of them is not cached."""
        hidden, E, shared = x.shape[1], slot_of.shape[0], w_down.shape[1]
        residual, h = np.empty((1, hidden), np.float32), np.empty((1, hidden), np.float32)
        for i in range(hidden):
            residual[0, i] = x[0, i] + mixer_out[0, i]
        _rms_norm(residual, norm_weight, eps, zero_centred, h)
        proj = np.empty(w_in.shape[0], np.float32)
        _gemv_bf16(w_in, h[0], proj)
        weights = np.empty(ids.shape[0], np.float32)
        _softmax_top_k(proj[:E], norm_topk, ids, weights)
        for j in range(ids.shape[0]):
            if slot_of[ids[j]] < 0:
                return False
        # the shared expert first, then the routed ones: the eager path's order of the adds
        out[0, :] = residual[0]
        if shared:
            first = E + 1 if gated else E
            act, y = np.empty(shared, np.float32), np.empty(hidden, np.float32)
            for c in range(shared):
                gate = proj[first + c]
                act[c] = gate / (np.float32(1.0) + np.exp(-gate)) * proj[first + shared + c]
            _gemv_bf16(w_down, act, y)
            scale = np.float32(1.0) / (np.float32(1.0) + np.exp(-proj[E])) if gated else np.float32(1.0)
            for i in range(hidden):
                out[0, i] += scale * y[i]
        xp, xs = np.empty(hidden, np.float32), np.empty(hidden // group, np.float32)
        _lay_out(h[0], bits, group, mxfp4, xp, xs)
        gate_up, act = np.empty(2 * inter, np.float32), np.empty(inter, np.float32)
        ap, asum = np.empty(inter, np.float32), np.empty(inter // group, np.float32)
        y, routed = np.empty(hidden, np.float32), np.zeros(hidden, np.float32)
        bf16_buf = np.empty(1, np.uint32)
        for j in range(ids.shape[0]):
            rec8, rec16 = p8[slot_of[ids[j]]], p16[slot_of[ids[j]]]
            _project(rec8, rec16, offs[0:3], hidden, bits, group, mxfp4, 0, 2 * inter, xp, xs, half_pow2, gate_up)
            _activation(gate_up, inter, rec16, offs, bits, group, mxfp4, with_bias, limit, alpha, act, ap, asum, bf16_buf)
            _project(rec8, rec16, offs[5:8], inter, bits, group, mxfp4, 0, hidden, ap, asum, half_pow2, y)
            _add_weighted(routed, weights[j], y, rec16, offs, with_bias, bf16_buf)
        for i in range(hidden):
            out[0, i] += routed[i]
        return True

    return moe_step


def moe_kernel(layout: RecordLayout, act: Swiglu):
    """The compiled `moe_step` for these records and this activation (compiled on first use)."""
    return _kernel(*_variant(layout, act))
