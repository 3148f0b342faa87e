"""Gated DeltaNet decode step for one token of each of B sequences, in two launches per layer:

  conv_step:  the depthwise causal conv over (kept window, new input) + SiLU; the window shifts in place.
  delta_step: per value head, l2-normalise q and k, the gates beta = sigmoid(b) and
              g = -exp(A_log) * softplus(a + dt_bias), the state update S = S*exp(g) + k (x) (v - S^T k)*beta
              in place, o = S^T q, then the gated RMSNorm of o with z (silu(z), or sigmoid(z): Qwen4-Exp).

A batch's states lie in one tensor (a StatePool's slots, layers/state.py), sequence i's at row i.
With `active` (0 for a pooled graph's idle slot) an idle sequence's window and state stay exactly as
they were: its conv does not shift, its decay is exp(0) and its update k * 0.

The reference is the eager PyTorch path (layers/deltanet.py), which tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_step_kernel(x_ptr, state_ptr, w_ptr, out_ptr, active_ptr, C, x_stride, KERNEL: tl.constexpr,
                      BLOCK: tl.constexpr, MASKED: tl.constexpr):
    seq = tl.program_id(1)
    x_ptr += seq * x_stride
    out_ptr += seq * C
    state_ptr += seq * (KERNEL - 1) * C
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    if MASKED:  # an idle sequence's window stays as it is
        shift = mask & (tl.load(active_ptr + seq) != 0)
    else:
        shift = mask
    x = tl.load(x_ptr + cols, mask=mask).to(tl.float32)
    acc = x * tl.load(w_ptr + cols * KERNEL + KERNEL - 1, mask=mask).to(tl.float32)
    for i in tl.static_range(KERNEL - 1):  # state rows 0..K-2 are the inputs K-1..1 steps ago
        s = tl.load(state_ptr + i * C + cols, mask=mask)
        acc += s.to(tl.float32) * tl.load(w_ptr + cols * KERNEL + i, mask=mask).to(tl.float32)
        if i + 1 < KERNEL - 1:
            tl.store(state_ptr + i * C + cols, tl.load(state_ptr + (i + 1) * C + cols, mask=mask), mask=shift)
    tl.store(state_ptr + (KERNEL - 2) * C + cols, x.to(state_ptr.dtype.element_ty), mask=shift)
    out = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def conv_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, active: torch.Tensor | None = None
              ) -> torch.Tensor:
    """x [C] new input, or [B, C] one per sequence; state [K-1, C] (or [B, K-1, C]) the previous
    inputs (oldest first), shifted in place where `active` [B] is not 0; weight [C, 1, K] ->
    silu(conv), shaped as x."""
    C, K = x.shape[-1], weight.shape[-1]
    B = x.numel() // C
    # x may be a column slice of the fused projections: rows apart by their stride, read in place
    assert state.is_contiguous() and state.numel() == B * (K - 1) * C and x.stride(-1) == 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    BLOCK = 1024
    _conv_step_kernel[(triton.cdiv(C, BLOCK), B)](x, state, weight, out, x if active is None else active, C,
                                                   x.stride(0) if x.ndim == 2 else C, KERNEL=K, BLOCK=BLOCK,
                                                   MASKED=active is not None)
    return out


@triton.jit
def _delta_step_kernel(
    qkv_ptr, z_ptr, b_ptr, a_ptr, alog_ptr, dtb_ptr, normw_ptr, state_ptr, out_ptr, active_ptr,
    eps, qkv_stride, z_stride, b_stride, a_stride, KEY_HEADS: tl.constexpr, VALUE_HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    SIGMOID_GATE: tl.constexpr, MASKED: tl.constexpr,
):
    j = tl.program_id(0)  # value head
    seq = tl.program_id(1)  # one token of each sequence: its inputs, state and output at row seq
    qkv_ptr += seq * qkv_stride
    z_ptr += seq * z_stride
    out_ptr += seq * VALUE_HEADS * DV
    b_ptr += seq * b_stride
    a_ptr += seq * a_stride
    state_ptr += seq * VALUE_HEADS * DK * DV
    kh = j // (VALUE_HEADS // KEY_HEADS)
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    q = tl.load(qkv_ptr + kh * DK + dk).to(tl.float32)
    k = tl.load(qkv_ptr + KEY_HEADS * DK + kh * DK + dk).to(tl.float32)
    v = tl.load(qkv_ptr + 2 * KEY_HEADS * DK + j * DV + dv).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * (1.0 / tl.sqrt(DK * 1.0))
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    beta = tl.sigmoid(tl.load(b_ptr + j).to(tl.float32))
    a = tl.load(a_ptr + j).to(tl.float32) + tl.load(dtb_ptr + j).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
    g = -tl.exp(tl.load(alog_ptr + j).to(tl.float32)) * softplus
    if MASKED:  # an idle sequence: no decay and no update, its state exactly as it was
        run = (tl.load(active_ptr + seq) != 0).to(tl.float32)
        g = g * run
        beta = beta * run
    offs = j * DK * DV + dk[:, None] * DV + dv[None, :]
    S = tl.load(state_ptr + offs) * tl.exp(g)
    delta = (v - tl.sum(S * k[:, None], axis=0)) * beta
    S = S + k[:, None] * delta[None, :]
    tl.store(state_ptr + offs, S)
    o = tl.sum(S * q[:, None], axis=0)
    o = o.to(out_ptr.dtype.element_ty).to(tl.float32)  # the eager path rounds here (model dtype)
    normed = o * tl.rsqrt(tl.sum(o * o, axis=0) / DV + eps)
    normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
    z = tl.load(z_ptr + j * DV + dv).to(tl.float32)
    w = tl.load(normw_ptr + dv).to(tl.float32)
    gate = 1.0 / (1.0 + tl.exp(-z))  # sigmoid(z): Qwen4-Exp's output gate; silu(z) = z * sigmoid(z)
    if not SIGMOID_GATE:
        gate = z * gate
    tl.store(out_ptr + j * DV + dv, (w * normed * gate).to(out_ptr.dtype.element_ty))


def delta_step(qkv, z, b, a, A_log, dt_bias, norm_weight, state, key_heads: int, eps: float,
               sigmoid_gate: bool = False, active: torch.Tensor | None = None) -> torch.Tensor:
    """One token: qkv [2*Hk*dk + Hv*dv] (after conv), z [Hv*dv], b, a [Hv]; state [Hv, dk, dv] fp32,
    updated in place -> gated-normed output [Hv*dv] in qkv's dtype, gated by silu(z) (or sigmoid(z)).
    One token of each of B sequences: every input with a leading [B], state [B, Hv, dk, dv], and
    `active` [B] (0: that sequence's state is left as it was)."""
    Hv, DK, DV = state.shape[-3:]
    B = state.numel() // (Hv * DK * DV)
    # the inputs may be column slices of the fused projections: rows apart by their strides, read in place
    assert state.is_contiguous() and all(t.stride(-1) == 1 for t in (qkv, z, b, a))
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    _delta_step_kernel[(Hv, B)](
        qkv, z, b, a, A_log, dt_bias, norm_weight, state, out, z if active is None else active, eps,
        *(t.stride(0) if t.ndim == 2 else t.shape[0] for t in (qkv, z, b, a)),
        KEY_HEADS=key_heads, VALUE_HEADS=Hv, DK=DK, DV=DV, SIGMOID_GATE=sigmoid_gate, MASKED=active is not None,
        num_warps=8 if DK * DV >= 16384 else 4,
    )
    return out
