"""One-token decode steps of the dense layers on the CPU, compiled by numba: what the Triton
kernels do on the GPU (deltanet_step.py, gemv16.py, int8_gemv.py), for fp32 tensors. A decode step
of the eager PyTorch path spends its time launching small operators (~5 us each; the DeltaNet step
alone is ~70 of them, 430 us per layer on the demo model) and in one-row matmuls that PyTorch runs
at a fraction of the memory bandwidth (EXPERIMENTS entry 73); here each is one call.

The reference is the eager PyTorch path (layers/deltanet.py), which tests compare against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import kernels
from .cpu_experts import _bf16_dot, _bf16_lanes, numba_jit


@numba_jit()
def _deltanet_step(qkv, z, b, a, conv_state, conv_w, a_log, dt_bias, norm_w, state, key_heads, eps, sigmoid_gate, out):
    C = qkv.shape[0]
    K = conv_w.shape[1]
    # the depthwise causal conv over (the kept K-1 inputs, this one) + SiLU; the window shifts in place
    conv = np.empty(C, np.float32)
    for c in range(C):
        acc = qkv[c] * conv_w[c, K - 1]
        for i in range(K - 1):
            acc += conv_state[i, c] * conv_w[c, i]
        for i in range(K - 2):
            conv_state[i, c] = conv_state[i + 1, c]
        conv_state[K - 2, c] = qkv[c]
        conv[c] = acc / (np.float32(1.0) + np.exp(-acc))
    value_heads, dk, dv = state.shape
    rep = value_heads // key_heads
    q_scale = np.float32(1.0 / math.sqrt(dk))
    for j in range(value_heads):
        kh = j // rep
        q = conv[kh * dk : (kh + 1) * dk]
        k = conv[(key_heads + kh) * dk : (key_heads + kh + 1) * dk]
        v = conv[2 * key_heads * dk + j * dv : 2 * key_heads * dk + (j + 1) * dv]
        qn, kn = np.float32(0.0), np.float32(0.0)
        for i in range(dk):
            qn += q[i] * q[i]
            kn += k[i] * k[i]
        qn = q_scale / np.sqrt(qn + np.float32(1e-6))
        kn = np.float32(1.0) / np.sqrt(kn + np.float32(1e-6))
        beta = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[j]))
        x = a[j] + dt_bias[j]
        softplus = x if x > 20.0 else np.log1p(np.exp(x))
        decay = np.exp(-np.exp(a_log[j]) * softplus)
        S = state[j]
        # S *= exp(g); delta = (v - S^T k) * beta; S += k (x) delta; o = S^T q
        kv = np.zeros(dv, np.float32)
        for r in range(dk):
            kr = k[r] * kn
            for c in range(dv):
                S[r, c] *= decay
                kv[c] += S[r, c] * kr
        o = np.zeros(dv, np.float32)
        for c in range(dv):
            kv[c] = (v[c] - kv[c]) * beta
        for r in range(dk):
            kr, qr = k[r] * kn, q[r] * qn
            for c in range(dv):
                S[r, c] += kr * kv[c]
                o[c] += S[r, c] * qr
        # the gated RMSNorm of o with z
        ms = np.float32(0.0)
        for c in range(dv):
            ms += o[c] * o[c]
        inv = np.float32(1.0) / np.sqrt(ms / dv + eps)
        for c in range(dv):
            zc = z[j * dv + c]
            gate = np.float32(1.0) / (np.float32(1.0) + np.exp(-zc))
            out[j * dv + c] = norm_w[c] * o[c] * inv * (gate if sigmoid_gate else zc * gate)


def deltanet_step(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor, conv_state: torch.Tensor,
                  conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                  state: torch.Tensor, key_heads: int, eps: float, sigmoid_gate: bool = False) -> torch.Tensor:
    """One token, fp32 CPU tensors: qkv [2*Hk*dk + Hv*dv] (before the conv), z [Hv*dv], b, a [Hv];
    conv_state [K-1, C] (oldest first) and state [Hv, dk, dv] updated in place; conv_weight
    [C, 1, K] -> the gated-normed output [Hv*dv] (gated by silu(z), or sigmoid(z) with sigmoid_gate)."""
    out = torch.empty_like(z)
    arrays = (t.detach().numpy() for t in (qkv, z, b, a, conv_state, conv_weight[:, 0], A_log, dt_bias, norm_weight, state))
    _deltanet_step(*arrays, key_heads, eps, sigmoid_gate, out.numpy())
    return out


# Up to this many weight bytes a projection of a few rows runs in `gemv` on the calling thread;
# larger ones (a big model's projections, its lm_head) go to PyTorch's multithreaded matmul.
GEMV_MAX_BYTES = 16 << 20
# Up to this many rows (a decode step's batch) `gemv` reads each weight row once for all of them;
# more (a prefill chunk) go to the library matmul, which is compute-bound there.
GEMV_MAX_ROWS = 32


@numba_jit()
def _gemm(w, x, out):
    """out[t, r] = sum_i w[r, i] x[t, i] for the few rows t of x (fp32 sums; w float32 or int8),
    each weight row read once for all of them. Written as plain loops: LLVM vectorizes them, and
    unlike a library call for a few rows they need no packing or threading: EXPERIMENTS entry 73
    measured 42 us against PyTorch's 104 for one row through a [784, 256] fp32 weight out of cache."""
    n, k = w.shape
    for r in range(n):
        row = w[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = np.float32(0.0)
            for i in range(k):
                acc += np.float32(row[i]) * xt[i]
            out[t, r] = acc


@numba_jit()
def _gemm_bf16(w16, x, out):
    """out [T, N] = x [T, K] @ w^T over bfloat16 weights (as uint16) for the few rows of a step: a
    `_bf16_dot` per weight row and token, each token laid out for it once; half the bytes of fp32
    to read. Each token's sums run in the same order whatever T: a batch's rows equal a lone
    token's to the bit."""
    n, k = w16.shape
    xp = np.empty((x.shape[0], k), np.float32)
    for t in range(x.shape[0]):
        _bf16_lanes(x[t], xp[t])
    for r in range(n):
        for t in range(x.shape[0]):
            out[t, r] = _bf16_dot(w16, r * k, xp[t], k)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 (a few rows: `takes_gemv`) and weight [N, K] (fp32, bf16, or int8 codes with a
    per-row fp32 scale [N]) on the CPU -> x @ weight^T [M, N] fp32 (times scale)."""
    x, weight = np.ascontiguousarray(x.detach().reshape(-1, weight.shape[1]).numpy()), weight.detach()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    if weight.dtype == torch.bfloat16:
        _gemm_bf16(weight.view(torch.uint16).numpy(), x, out.numpy())
    else:
        _gemm(weight.numpy(), x, out.numpy())
    return out if scale is None else out * scale


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T goes through `gemv`: up to GEMV_MAX_ROWS fp32 rows on the CPU (numba
    installed), a contiguous fp32, bf16 or int8 weight of at most GEMV_MAX_BYTES."""
    return (x.shape[-1] == weight.shape[1] and x.numel() <= GEMV_MAX_ROWS * weight.shape[1]
            and weight.dtype in (torch.float32, torch.bfloat16, torch.int8) and weight.is_contiguous()
            and weight.numel() * weight.element_size() <= GEMV_MAX_BYTES and kernels.use_cpu_kernels(x))


@numba_jit(inline="always")
def _rotate_half(x, cos, sin):
    """x [heads, d] rotated in place by the partial NeoX rotary of one position: its first
    rot = len(cos) dims (layers/rotary.apply_rotary; cos and sin repeat their first half)."""
    half = cos.shape[0] // 2
    for j in range(x.shape[0]):
        for i in range(half):
            a, b = x[j, i], x[j, half + i]
            x[j, i] = a * cos[i] - b * sin[i]
            x[j, half + i] = b * cos[half + i] + a * sin[half + i]


@numba_jit(inline="always")
def _normed_projection(x, norm_weight, eps, zero_centred, w16):
    """The one-token steps' start: w16 (bf16 bits) @ rms_norm(x [1, H]) -> [rows] fp32."""
    h = np.empty_like(x)
    _rms_norm(x, norm_weight, eps, zero_centred, h)
    proj = np.empty((1, w16.shape[0]), np.float32)
    _gemm_bf16(w16, h, proj)
    return proj[0]


@numba_jit()
def _normed_projections(x, norm_weight, eps, zero_centred, w16, proj):
    """The batched steps' start: proj [B, rows] = w16 (bf16 bits) @ rms_norm(x [B, H]), the weights
    read once for the batch (`_normed_projection` of each row)."""
    h = np.empty_like(x)
    _rms_norm(x, norm_weight, eps, zero_centred, h)
    _gemm_bf16(w16, h, proj)


def normed_gemv_weights(norm_weight: torch.Tensor, eps: float, zero_centred: bool, weight: torch.Tensor) -> tuple:
    """`normed_gemv`'s weights as its kernel reads them: an RMSNorm's and a bf16 matrix's, made once."""
    return norm_weight.numpy(), np.float32(eps), zero_centred, weight.view(torch.uint16).numpy()


def normed_gemv(x: torch.Tensor, weights: tuple) -> torch.Tensor:
    """weight @ rms_norm(x) for a decode step's rows x [B, H] fp32 in one call (`_normed_projections`,
    the layers' own start) -> [B, rows] fp32; weights: `normed_gemv_weights`."""
    out = torch.empty(x.shape[0], weights[-1].shape[0], dtype=torch.float32)
    _normed_projections(x.numpy(), *weights, out.numpy())
    return out


@numba_jit(inline="always")
def _attend(proj, cos, sin, k_cache, v_cache, position, gated, q_norm, k_norm, qk_eps, qk_zero_centred, attended):
    """One token's attention from its projections proj [rows] (the fused q_proj rows, per head d
    query rows then d gate rows where gated, then k_proj's and v_proj's): per-head q/k RMSNorms,
    partial rotary (cos, sin [rot]), this token's key and value written at `position` of the caches
    [capacity, kv_heads, d], attention over positions 0 .. position, the gate -> attended [heads * d]."""
    kv_heads, d = k_cache.shape[1], k_cache.shape[2]
    heads, width = attended.shape[0] // d, 2 * d if gated else d
    q = np.empty((heads, d), np.float32)
    for j in range(heads):
        q[j] = proj[j * width : j * width + d]
    k, v = k_cache[position], v_cache[position]
    for j in range(kv_heads):
        k[j] = proj[heads * width + j * d : heads * width + (j + 1) * d]
        v[j] = proj[heads * width + (kv_heads + j) * d : heads * width + (kv_heads + j + 1) * d]
    _rms_norm(q, q_norm, qk_eps, qk_zero_centred, q)
    _rms_norm(k, k_norm, qk_eps, qk_zero_centred, k)
    _rotate_half(q, cos, sin)
    _rotate_half(k, cos, sin)
    scale = np.float32(1.0 / math.sqrt(d))
    scores = np.empty(position + 1, np.float32)
    for j in range(heads):
        kv = j // (heads // kv_heads)
        top = np.float32(-np.inf)
        for t in range(position + 1):
            s = np.float32(0.0)
            for i in range(d):
                s += q[j, i] * k_cache[t, kv, i]
            scores[t] = s * scale
            top = max(top, scores[t])
        total = np.float32(0.0)
        o = np.zeros(d, np.float32)
        for t in range(position + 1):
            p = np.exp(scores[t] - top)
            total += p
            for i in range(d):
                o[i] += p * v_cache[t, kv, i]
        for i in range(d):
            a = o[i] / total
            if gated:
                a *= np.float32(1.0) / (np.float32(1.0) + np.exp(-proj[j * width + d + i]))
            attended[j * d + i] = a


@numba_jit()
def _attention_step(x, cos, sin, k_cache, v_cache, position, out, norm_weight, eps, zero_centred, w_qkv, gated, q_norm,
                    k_norm, qk_eps, qk_zero_centred, w_o):
    """One token of a gated (or plain) GQA attention layer with per-head q/k RMSNorms and partial
    rotary; layers/attention.py's arithmetic. x [1, H]: the layer's input, normed first by
    norm_weight (the layer's input norm); k_cache, v_cache [capacity, kv_heads, d]: this token's key
    and value are written at `position`, and it attends over positions 0 .. position -> out [H].
    The weights: q_norm, k_norm [d], the per-head norms; w_qkv, the fused q_proj (per head: d query
    rows, then d gate rows where gated), k_proj and v_proj rows as bf16 bits; w_o, o_proj's."""
    proj = _normed_projection(x, norm_weight, eps, zero_centred, w_qkv)
    attended = np.empty(w_o.shape[1], np.float32)
    _attend(proj, cos, sin, k_cache, v_cache, position, gated, q_norm, k_norm, qk_eps, qk_zero_centred, attended)
    _gemm_bf16(w_o, attended.reshape((1, attended.shape[0])), out.reshape((1, out.shape[0])))


@numba_jit()
def _attend_one(proj, cos, sin, k_cache, v_cache, position, attended, gated, q_norm, k_norm, qk_eps, qk_zero_centred):
    """`_attend` of one sequence of a batch (its caches are its own arrays)."""
    _attend(proj, cos, sin, k_cache, v_cache, position, gated, q_norm, k_norm, qk_eps, qk_zero_centred, attended)


def attention_weights(norm_weight: torch.Tensor, eps: float, zero_centred: bool, w_qkv: torch.Tensor, gated: bool,
                      q_norm: torch.Tensor, k_norm: torch.Tensor, qk_eps: float, qk_zero_centred: bool,
                      w_o: torch.Tensor) -> tuple:
    """`attention_step`'s weights as its kernel reads them (numpy views, bf16 tensors as their bits):
    made once per layer, since each conversion costs about a microsecond per call."""
    return (norm_weight.numpy(), np.float32(eps), zero_centred, w_qkv.view(torch.uint16).numpy(), gated, q_norm.numpy(),
            k_norm.numpy(), np.float32(qk_eps), qk_zero_centred, w_o.view(torch.uint16).numpy())


def attention_step(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   position: int, weights: tuple) -> torch.Tensor:
    """One token's attention layer on the CPU in one call (`_attention_step`): x [1, H] fp32 before
    the input norm, cos/sin [1, rot], the caches fp32 [capacity, kv_heads, d] with room at
    `position`, `attention_weights` -> [1, H] fp32."""
    out = torch.empty(1, weights[-1].shape[0], dtype=torch.float32)
    # numpy's indexing, a tenth of a tensor's: these calls run once per layer and token
    _attention_step(x.numpy(), cos.numpy()[0], sin.numpy()[0], k_cache.numpy(), v_cache.numpy(), position,
                    out.numpy()[0], *weights)
    return out


def attention_steps(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor, int]],
                    weights: tuple) -> torch.Tensor:
    """One token of each of B sequences through the attention layer: `attention_step`'s arithmetic
    for each, with the projections of all B in one call that reads their weights once, then each
    sequence's attention over its own caches (one call each), then o_proj for all B in one call.
    x [B, H], cos/sin [B, rot]; caches[b]: sequence b's (k, v, position), as `attention_step` takes
    them -> [B, H] fp32."""
    norm_weight, eps, zero_centred, w_qkv, *heads, w_o = weights
    proj = np.empty((x.shape[0], w_qkv.shape[0]), np.float32)
    _normed_projections(x.numpy(), norm_weight, eps, zero_centred, w_qkv, proj)
    attended = np.empty((x.shape[0], w_o.shape[1]), np.float32)
    cos, sin = cos.numpy(), sin.numpy()
    for b, (k_cache, v_cache, position) in enumerate(caches):
        _attend_one(proj[b], cos[b], sin[b], k_cache.numpy(), v_cache.numpy(), position, attended[b], *heads)
    out = torch.empty(x.shape[0], w_o.shape[0], dtype=torch.float32)
    _gemm_bf16(w_o, attended, out.numpy())
    return out


@numba_jit()
def _deltanet_mix(proj, conv_state, state, conv_w, a_log, dt_bias, out_norm, out_eps, key_heads, sigmoid_gate, normed):
    """One token's DeltaNet step from its projections proj [rows] (the fused in_proj's qkv, z, b, a
    rows): `_deltanet_step` on the states (its output norm out_norm, out_eps) -> normed [Hv * dv]."""
    channels, value_heads, values = conv_state.shape[1], state.shape[0], state.shape[0] * state.shape[2]
    z, b = proj[channels : channels + values], proj[channels + values : channels + values + value_heads]
    _deltanet_step(proj[:channels], z, b, proj[channels + values + value_heads :], conv_state, conv_w, a_log, dt_bias,
                   out_norm, state, key_heads, out_eps, sigmoid_gate, normed)


@numba_jit()
def _deltanet_layer_step(x, conv_state, state, out, norm_weight, eps, zero_centred, w_in, conv_w, a_log, dt_bias,
                         out_norm, out_eps, key_heads, sigmoid_gate, w_out):
    """One token of a Gated DeltaNet layer: x [1, H] normed by norm_weight (the layer's input
    norm), the fused in_proj (qkv, z, b, a rows as bf16 bits), `_deltanet_mix` on the states,
    out_proj (bf16 bits) -> out [H]."""
    proj = _normed_projection(x, norm_weight, eps, zero_centred, w_in)
    normed = np.empty(w_out.shape[1], np.float32)
    _deltanet_mix(proj, conv_state, state, conv_w, a_log, dt_bias, out_norm, out_eps, key_heads, sigmoid_gate, normed)
    _gemm_bf16(w_out, normed.reshape((1, normed.shape[0])), out.reshape((1, out.shape[0])))


def deltanet_layer_weights(norm_weight: torch.Tensor, eps: float, zero_centred: bool, w_in: torch.Tensor,
                           conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, out_norm: torch.Tensor,
                           out_eps: float, key_heads: int, sigmoid_gate: bool, w_out: torch.Tensor) -> tuple:
    """`deltanet_layer_step`'s weights as its kernel reads them, made once per layer (`attention_weights`)."""
    return (norm_weight.numpy(), np.float32(eps), zero_centred, w_in.view(torch.uint16).numpy(),
            conv_weight[:, 0].numpy(), A_log.numpy(), dt_bias.numpy(), out_norm.numpy(), float(out_eps), key_heads,
            sigmoid_gate, w_out.view(torch.uint16).numpy())


def deltanet_layer_step(x: torch.Tensor, conv_state: torch.Tensor, state: torch.Tensor, weights: tuple) -> torch.Tensor:
    """One token's Gated DeltaNet layer on the CPU in one call (`_deltanet_layer_step`): x [1, H]
    fp32 before the input norm, the states as `deltanet_step` takes them (updated in place),
    `deltanet_layer_weights` -> [1, H]."""
    out = torch.empty(1, weights[-1].shape[0], dtype=torch.float32)
    _deltanet_layer_step(x.numpy(), conv_state.numpy(), state.numpy(), out.numpy()[0], *weights)  # numpy's indexing: `attention_step`
    return out


def deltanet_layer_steps(x: torch.Tensor, states: list[tuple[torch.Tensor, torch.Tensor]], weights: tuple) -> torch.Tensor:
    """One token of each of B sequences through the Gated DeltaNet layer: `deltanet_layer_step`'s
    arithmetic for each, with the projections of all B in one call that reads their weights once,
    then each sequence's conv and recurrence on its own states (one call each), then out_proj for
    all B in one call. x [B, H]; states[b]: sequence b's (conv_state, state) -> [B, H] fp32."""
    norm_weight, eps, zero_centred, w_in, *mix, w_out = weights
    proj = np.empty((x.shape[0], w_in.shape[0]), np.float32)
    _normed_projections(x.numpy(), norm_weight, eps, zero_centred, w_in, proj)
    normed = np.empty((x.shape[0], w_out.shape[1]), np.float32)
    for b, (conv_state, state) in enumerate(states):
        _deltanet_mix(proj[b], conv_state.numpy(), state.numpy(), *mix, normed[b])
    out = torch.empty(x.shape[0], w_out.shape[0], dtype=torch.float32)
    _gemm_bf16(w_out, normed, out.numpy())
    return out


ROWS_MAX_ELEMENTS = 1 << 16  # a decode step's rows (a batch's, the q/k heads'); a prefill's go to PyTorch's threads


@numba_jit()
def _rms_norm(x, weight, eps, zero_centred, out):
    rows, dim = x.shape
    for r in range(rows):
        ms = np.float32(0.0)
        for i in range(dim):
            ms += x[r, i] * x[r, i]
        inv = np.float32(1.0) / np.sqrt(ms / dim + eps)
        for i in range(dim):
            out[r, i] = x[r, i] * inv * (np.float32(1.0) + weight[i] if zero_centred else weight[i])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool) -> torch.Tensor:
    """x [..., D] fp32 normalised over its last dim (layers/norm.py's RMSNorm) -> [..., D]."""
    rows = x.detach().reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=torch.float32)
    _rms_norm(np.ascontiguousarray(rows.numpy()), weight.detach().numpy(), np.float32(eps), zero_centred, out.numpy())
    return out.view(x.shape)


def takes_rows(x: torch.Tensor) -> bool:
    """Whether an elementwise step over x goes through these kernels: fp32 on the CPU, a decode
    step's few rows."""
    return x.numel() <= ROWS_MAX_ELEMENTS and kernels.use_cpu_kernels(x)
