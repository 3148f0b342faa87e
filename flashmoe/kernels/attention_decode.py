"""GQA attention of one query token over a KV cache read in place (flash-decoding), optionally
with an output gate, in two launches:

  split:   program (kv head j, split s) takes the G = heads / kv_heads query heads of KV head j
           (they share its keys) over positions [s * len, (s + 1) * len) of 0..n-1, in blocks of
           BLOCK_N, and writes its running max, sum and unnormalised output (fp32);
  combine: program (query head i) rescales the live splits to their common max, normalises, and
           applies the output gate if there is one: out = softmax(q k^T / sqrt(d)) v (* sigmoid(gate)).

Reference: `attend` then `out * sigmoid(gate)` of Attention.forward (layers/attention.py),
with the model dtype's roundings where the eager code rounds (the attention output, the sigmoid).

Eagerly (`attention_decode`) n is a Python int: the cache holds exactly n positions, and the grid
has no more splits than n has blocks (with the compiled variants of the full grid). Inside a CUDA
graph (`attention_decode_batch`, the decode step of one or several sequences, runtime/graphs.py)
the buffers are each sequence's reserved capacity and n = last + 1 is read on the device from the
batch's positions: the grid is fixed (MAX_SPLITS programs per KV head and a third axis over the
sequences, the splits past n idle), the split length is derived from n in the kernel, so splits
stay balanced whatever n is and blocks past n are never loaded, and n is not a specialisation key,
so the graph stays valid as n grows. Each sequence's cache is a buffer of its own, which the
kernels reach at an element offset from the first sequence's (`kv_offsets`); one more launch
appends the batch's new keys and values at their positions. Three launches a layer, whatever the
batch: per sequence, the step had run two index copies, a mask, split, combine and a concatenation.

Eagerly every KV head is copied G = 16 times per step (repeat_interleave) and, in the graph, the
whole reserved buffer is attended under a mask: 8 launches (2 copies, scaled_dot_product_attention,
a reshape copy, sigmoid and product; 2 more build the mask) plus 2 x 16 x n x d x 2 bytes of
copies. Here 2 launches read the n used positions once. For the 397B (2 KV heads, d = 256) up to
64 splits make 128 programs, about one per H200 SM (one fits an SM at 255 registers a thread), each
a [16, 256] x [256, 64] tensor-core product per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED

MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _bounds(last_ptr, n_arg, window, SPLITS, BLOCK_N: tl.constexpr, IN_GRAPH: tl.constexpr):
    """(first, n, split length): the positions to attend, first .. n-1 (the last `window` with a
    sliding window, window > 0), and how many each split takes (whole blocks)."""
    if IN_GRAPH:
        n = tl.load(last_ptr).to(tl.int32) + 1
    else:
        n = n_arg
    first = tl.where(window > 0, tl.maximum(n - window, 0), 0)
    return first, n, tl.cdiv(tl.cdiv(n - first, SPLITS), BLOCK_N) * BLOCK_N


@triton.jit(do_not_specialize=["n_arg"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, offsets_ptr, last_ptr, m_ptr, l_ptr, acc_ptr, n_arg, window, pos_stride, head_stride, G,
    qk_scale, SPLITS, HEADS,
    IN_GRAPH: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
):
    kv = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)  # the sequence
    first, n, split_len = _bounds(last_ptr + b, n_arg, window, SPLITS, BLOCK_N, IN_GRAPH)
    if IN_GRAPH:  # the sequence's own cache buffers, elements away from the first one's
        k_ptr += tl.load(offsets_ptr + 2 * b)
        v_ptr += tl.load(offsets_ptr + 2 * b + 1)
    lo = first + split * split_len
    hi = tl.minimum(lo + split_len, n)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kv * G + g  # query head i reads KV head i // G, as repeat_interleave pairs them
    q = tl.load(q_ptr + (b * HEADS + heads[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        offs = pos[:, None].to(tl.int64) * pos_stride + kv * head_stride + d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
        if FP32_DOT:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units: exp2 below
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    mine = (g < G) & (lo < n)  # a split past n writes nothing; the combine reads live splits only
    part = (b * HEADS + heads) * SPLITS + split
    tl.store(m_ptr + part, m, mask=mine)
    tl.store(l_ptr + part, l, mask=mine)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=mine[:, None])


@triton.jit(do_not_specialize=["n_arg"])
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, gate_ptr, sinks_ptr, out_ptr, last_ptr, n_arg, window, gate_stride, gate_batch_stride,
    SPLITS, HEADS,
    IN_GRAPH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, GATED: tl.constexpr,
    SINKS: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    first, n, split_len = _bounds(last_ptr + b, n_arg, window, SPLITS, BLOCK_N, IN_GRAPH)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    live = s < tl.cdiv(n - first, split_len)
    part = (b * HEADS + h) * SPLITS + s
    m = tl.load(m_ptr + part, mask=live, other=float("-inf"))
    top = tl.max(m, axis=0)
    if SINKS:  # the head's sink logit joins the softmax's denominator (log2 units, as the scores)
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(top, sink)
    w = tl.exp2(m - top)  # 0 for the splits that are not live
    l = tl.sum(w * tl.load(l_ptr + part, mask=live, other=0.0), axis=0)
    if SINKS:
        l += tl.exp2(sink - top)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    o = (tl.sum(w[:, None] * acc, axis=0) / l).to(dt)
    if GATED:
        gate = tl.load(gate_ptr + b * gate_batch_stride + h * gate_stride + d)
        gate = tl.sigmoid(gate.to(tl.float32)).to(dt).to(tl.float32)
        o = (o.to(tl.float32) * gate).to(dt)
    tl.store(out_ptr + (b * HEADS + h) * D + d, o)


@triton.jit
def _append_kernel(k_new_ptr, v_new_ptr, k_ptr, v_ptr, offsets_ptr, last_ptr, k_new_stride, k_new_head_stride,
                   v_new_stride, v_new_head_stride, pos_stride, head_stride, D: tl.constexpr):
    """Sequence b's new key and value (KV head h) into its cache at its position."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    at = tl.load(last_ptr + b) * pos_stride + h * head_stride + d
    k = tl.load(k_new_ptr + b * k_new_stride + h * k_new_head_stride + d)
    v = tl.load(v_new_ptr + b * v_new_stride + h * v_new_head_stride + d)
    tl.store(k_ptr + tl.load(offsets_ptr + 2 * b) + at, k)
    tl.store(v_ptr + tl.load(offsets_ptr + 2 * b + 1) + at, v)


def kv_offsets(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """[B, 2] int64 on the caches' device: each sequence's key and value buffer as an element
    offset from the first sequence's, for `attention_decode_batch` (made outside a graph's capture,
    which refuses the copy to the device; valid while the buffers are). The buffers must share a
    dtype, a device and their strides (the kernels index them all with the first one's)."""
    k0, v0 = keys[0], values[0]
    if any(t.dtype != k0.dtype or t.device != k0.device or t.stride() != k0.stride() for t in (*keys, *values)):
        raise ValueError("kv_offsets: the caches differ in dtype, device or layout")
    size = k0.element_size()
    rows = [((k.data_ptr() - k0.data_ptr()) // size, (v.data_ptr() - v0.data_ptr()) // size) for k, v in zip(keys, values)]
    return torch.tensor(rows, dtype=torch.int64).to(k0.device)


def attention_decode(
    q: torch.Tensor, gate: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor, last: int,
    block_n: int | None = None, splits: int = MAX_SPLITS, sinks: torch.Tensor | None = None, window: int | None = None,
) -> torch.Tensor:
    """q [heads, d] contiguous, gate [heads, d] (unit stride along d) or None, keys / values [L, kv_heads, d]
    (same strides, unit along d; d a power of two >= 16); last: the last position to attend ->
    softmax(q k^T / sqrt(d)) v (* sigmoid(gate)) over positions 0..last, as [1, heads * d] in q's
    dtype; `splits` programs per KV head at most share the positions, `block_n` at a time.
    gpt-oss's variants: sinks [heads], a logit per head in each softmax's denominator (`attend`);
    window, the last `window` positions only (`window_mask`)."""
    return _attend(q[None], None if gate is None else gate[None], keys, values, None, last, block_n, splits, sinks, window)


def attention_decode_batch(
    q: torch.Tensor, gate: torch.Tensor | None, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
    values: torch.Tensor, offsets: torch.Tensor, last: torch.Tensor, sinks: torch.Tensor | None = None,
    window: int | None = None, block_n: int | None = None, splits: int = MAX_SPLITS,
) -> torch.Tensor:
    """One decode token of each of B sequences: q [B, heads, d] contiguous, gate [B, heads, d]
    (unit stride along d) or None; k_new / v_new [B, kv_heads, d] (unit stride along d) their new
    keys and values, each written first into its sequence's cache at last[b] (an int64 device tensor [B]); keys /
    values: the first sequence's cache buffers [L, kv_heads, d], the others `offsets` [B, 2]
    (kv_offsets) away -> [B, heads * d], each row `attention_decode` of its sequence over positions
    0..last[b]. Capturable: nothing depends on the positions' values on the host."""
    B, kv_heads, D = k_new.shape
    if v_new.shape != k_new.shape or k_new.stride(-1) != 1 or v_new.stride(-1) != 1 or offsets.shape != (B, 2) or last.shape != (B,):
        raise ValueError(f"attention_decode_batch: unsupported shapes k_new {tuple(k_new.shape)}, "
                         f"offsets {tuple(offsets.shape)}, last {tuple(last.shape)}")
    _append_kernel[(B, kv_heads)](k_new, v_new, keys, values, offsets, last, k_new.stride(0), k_new.stride(1),
                                  v_new.stride(0), v_new.stride(1), keys.stride(0), keys.stride(1), D=D)
    return _attend(q, gate, keys, values, offsets, last, block_n, splits, sinks, window).view(B, -1)


def _attend(q, gate, keys, values, offsets, last, block_n, splits, sinks, window) -> torch.Tensor:
    """The split and combine launches for q [B, heads, d]: eagerly (B = 1, `last` an int, no
    offsets), or a graph's batch (`last` [B] on the device, each sequence's buffers at `offsets`)."""
    B, heads, D = q.shape
    L, kv_heads, _ = keys.shape
    G = heads // kv_heads
    if (
        not q.is_contiguous() or keys.stride() != values.stride() or keys.stride(-1) != 1
        or (gate is not None and gate.stride(-1) != 1)
        or D < 16 or D != triton.next_power_of_2(D) or heads != G * kv_heads
    ):
        raise ValueError(f"attention_decode: unsupported shapes q {tuple(q.shape)}, keys {tuple(keys.shape)}")
    in_graph = offsets is not None
    n = 1 if in_graph else last + 1  # unused by the kernels in a graph
    fp32 = q.dtype == torch.float32 or INTERPRETED  # the interpreter's bf16 dots are wrong
    # Compiled for sm_90 at d = 256 and 8 warps: 16-bit blocks of 64 take 255 registers, no spills,
    # 43 KB of shared memory; fp32 blocks of 64 would need 280 KB (more than an SM has), 32 take 150.
    block_n = block_n or (32 if q.dtype == torch.float32 else 64)
    # Eagerly n is known: no more splits than blocks (a graph keeps the full grid, as n grows under it).
    # The compiled variants are those of the requested count, so a shorter grid compiles nothing new.
    span = min(n, window) if window else n
    live = splits if in_graph else min(splits, triton.cdiv(span, block_n))
    window = window or 0
    m = torch.empty(B, heads, live, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, heads, live, D, dtype=torch.float32, device=q.device)
    out = torch.empty(B, heads * D, dtype=q.dtype, device=q.device)
    last_ptr = last if in_graph else m  # a pointer the kernels never read when n is given
    _split_kernel[(kv_heads, live, B)](
        q, keys, values, offsets if in_graph else m, last_ptr, m, l, acc, n, window, keys.stride(0),
        keys.stride(1), G, _LOG2E / D**0.5, live, heads, IN_GRAPH=in_graph, FP32_DOT=fp32, PRECISION="ieee" if fp32 else "tf32",
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, D=D, num_warps=8 if D >= 128 else 4,
    )
    _combine_kernel[(heads, B)](
        m, l, acc, q if gate is None else gate, q if sinks is None else sinks, out, last_ptr, n, window,
        0 if gate is None else gate.stride(1), 0 if gate is None else gate.stride(0), live, heads,
        IN_GRAPH=in_graph, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(splits), D=D,
        GATED=gate is not None, SINKS=sinks is not None, num_warps=8 if splits * D >= 8192 else 4,
    )
    return out
