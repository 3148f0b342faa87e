"""Attention over a KV cache: GQA, partial NeoX rotary, and the variants the families differ by:
an output gate (Qwen3.5: q_proj yields [q_h | gate_h] per head, out * sigmoid(gate)), q/k RMSNorm
per head or across all heads (MiniMax), biases on q/k/v (GLM) and on o, and gpt-oss's sinks (a
learned logit per head that joins each softmax and takes its share of the mass, then is dropped)
and sliding windows (a layer that sees only its last `window` positions), and Qwen4-Exp's QSA
(a token indexer choosing the positions each query sees, layers/indexer.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels.cpu_step import attention_step, attention_steps, attention_weights
from .fused import Projections, project
from .int8_linear import Bf16Linear
from .indexer import IndexerSpec, TokenIndexer
from .norm import RMSNorm
from .state import IndexedKVCache, KVCache
from .rotary import RotaryEmbedding, apply_rotary


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """The shape and variant of one family's attention layers."""

    heads: int
    kv_heads: int
    head_dim: int
    gated: bool = False  # Qwen3.5: an output gate per head, computed by q_proj beside q
    qk_norm: Literal["head", "all"] | None = None  # RMSNorm of q and k: per head, or across all heads
    qkv_bias: bool = False
    o_bias: bool = False
    sinks: bool = False  # gpt-oss: a learned logit per head in every softmax (`sinks`)
    indexer: IndexerSpec | None = None  # Qwen4-Exp's QSA: each query sees the positions its indexer selects


class Attention(nn.Module):
    def __init__(self, hidden: int, spec: AttentionSpec, eps: float, zero_centred_norms: bool, window: int | None = None,
                 rotary: RotaryEmbedding | None = None):
        """rotary: the model's, for an indexer (it rotates each block's key at the block's start)."""
        super().__init__()
        self.spec, self.window = spec, window
        heads, kv, d = spec.heads, spec.kv_heads, spec.head_dim
        self.q_proj = nn.Linear(hidden, heads * d * (2 if spec.gated else 1), bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv * d, bias=spec.qkv_bias)
        self.in_proj = Projections(self, "q_proj", "k_proj", "v_proj")
        self.o_proj = nn.Linear(heads * d, hidden, bias=spec.o_bias)
        if spec.qk_norm is not None:
            width = {"head": (d, d), "all": (heads * d, kv * d)}[spec.qk_norm]
            self.q_norm = RMSNorm(width[0], eps, zero_centred_norms)
            self.k_norm = RMSNorm(width[1], eps, zero_centred_norms)
        if spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(heads), requires_grad=False)
        if spec.indexer is not None:
            self.indexer = TokenIndexer(hidden, spec.indexer, eps, zero_centred_norms, rotary)
        self._cpu_step_weights: tuple | None = None  # (input norm, decode_cpu's weights)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list, ctx,
                norm: RMSNorm | None = None) -> torch.Tensor:
        """x [T, hidden]: the tokens of one or more sequences (ctx.slices says where each lies),
        normed first by `norm` where given (the layer's input norm); cos/sin [T, rotary_dim];
        caches: each sequence's KVCache holding its earlier positions; ctx: the step's context
        (models/context.py). The projections run on all the tokens at once, the attention per
        sequence over its own cache."""
        T, s = x.shape[0], self.spec
        if T == len(caches) and ctx.graph_position is None and self.takes_cpu_step(x, norm):  # a token per sequence
            return self.decode_cpu(x, norm, cos, sin, caches)
        if norm is not None:
            x = norm(x)
        q, k, v = self.in_proj(x)
        gate = None
        if s.gated:
            q, gate = q.view(T, s.heads, 2 * s.head_dim).chunk(2, dim=-1)
        if s.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = self._rotate(q.view(T, s.heads, s.head_dim), cos, sin, "q")
        k = self._rotate(k.view(T, s.kv_heads, s.head_dim), cos, sin, "k")
        v = v.view(T, s.kv_heads, s.head_dim)
        if ctx.graph_position is not None:  # inside a graph: a token per sequence, the batch's attention in 3 launches
            from ..kernels.attention_decode import attention_decode_batch

            if s.indexer is not None or not kernels.use_kernels(q):
                raise ValueError("a decode graph's attention runs the kernels, without an indexer")
            out = attention_decode_batch(q, gate, k, v, caches[0].k, caches[0].v, ctx.kv_offsets[id(caches[0])],
                                         ctx.graph_position, self.sinks if s.sinks else None, self.window)
            return project(self.o_proj, out)
        index = self.indexer.project(x, cos, sin) if s.indexer is not None else None
        parts = [self._attend(q[sl], k[sl], v[sl], None if gate is None else gate[sl], cache,
                              None if index is None else (index[0][sl], index[1][sl]))
                 for sl, cache in zip(ctx.slices(T), caches)]
        return project(self.o_proj, parts[0] if len(parts) == 1 else torch.cat(parts))

    def takes_cpu_step(self, x: torch.Tensor, norm: RMSNorm | None) -> bool:
        """Whether decode tokens (one per sequence) go through `decode_cpu`: fp32 on the CPU (numba
        installed), an input norm to take in, the projections stored as bf16 and fused into one
        (the engine's CPU path), q/k normed per head, none of biases, sinks, a window or an indexer."""
        s = self.spec
        return (norm is not None and norm.group is None and kernels.use_cpu_kernels(x) and s.qk_norm == "head"
                and not (s.qkv_bias or s.o_bias or s.sinks) and self.window is None and s.indexer is None
                and self.in_proj.one_matrix(Bf16Linear) is not None and type(self.o_proj) is Bf16Linear)

    def decode_cpu(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]
                   ) -> torch.Tensor:
        """One token of each sequence on the CPU through numba (kernels/cpu_step): the eager path's
        input norm, projections, q/k norms, rotary, cache append, attention and gate, ~40 calls, in
        one call for one sequence (attention_step), in 2 + B for a batch of B (attention_steps)."""
        for cache in caches:
            cache.make_room(cache.length + 1)
        if len(caches) == 1:
            out = attention_step(x, cos, sin, caches[0].k, caches[0].v, caches[0].length, self.cpu_step_weights(norm))
        else:
            out = attention_steps(x, cos, sin, [(c.k, c.v, c.length) for c in caches], self.cpu_step_weights(norm))
        for cache in caches:
            cache.length += 1
        return out

    def cpu_step_weights(self, norm: RMSNorm) -> tuple:
        """The weights of `decode_cpu`'s kernel as it reads them (kernels/cpu_step.attention_weights),
        made at the first decode step: once loaded and fused, they are not replaced."""
        if self._cpu_step_weights is None or self._cpu_step_weights[0] is not norm:
            self._cpu_step_weights = norm, attention_weights(
                norm.weight, norm.eps, norm.zero_centred, self.in_proj.one_matrix(Bf16Linear).weight, self.spec.gated,
                self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.zero_centred, self.o_proj.weight)
        return self._cpu_step_weights[1]

    def _attend(self, q, k, v, gate, cache, index=None) -> torch.Tensor:
        """One sequence's n tokens over its cache, eagerly -> [n, heads * head_dim] (gated where the
        spec says); index: their index queries and keys, where an indexer selects what they see."""
        n, start = q.shape[0], cache.length
        keys, values, mask = cache.update(k, v)  # [L, kv_heads, head_dim], mask [n, L] or None
        if self.window is not None:
            mask = window_mask(n, keys.shape[0], self.window, keys.device)
        if index is not None:
            mask = self.indexer.select(*index, cache, start)
        sinks = self.sinks if self.spec.sinks else None
        if n == 1 and kernels.use_kernels(q) and index is None:
            from ..kernels.attention_decode import attention_decode

            # No mask needed: the cache holds exactly the sequence; a sliding window is the
            # kernel's first position, sinks join its softmax's denominator.
            return attention_decode(q[0], None if gate is None else gate[0], keys, values, keys.shape[0] - 1, sinks=sinks,
                                    window=self.window).view(1, -1)
        out = attend(q, keys, values, mask, sinks).reshape(n, -1)
        return out if gate is None else out * torch.sigmoid(gate.reshape(n, -1))

    def new_state(self, dtype: torch.dtype, device) -> KVCache:
        s = self.spec
        if s.indexer is not None:
            return IndexedKVCache(s.kv_heads, s.head_dim, s.indexer.head_dim, dtype, device)
        return KVCache(s.kv_heads, s.head_dim, dtype, device)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, which: str) -> torch.Tensor:
        """The rotary embedding of q or k [T, heads, d], after its per-head norm where there is one."""
        norm = getattr(self, f"{which}_norm", None) if self.spec.qk_norm == "head" else None
        if kernels.use_kernels(x):
            from ..kernels.rope import norm_rope

            weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
            return norm_rope(x, weight, cos, sin, eps, norm is not None and norm.zero_centred)
        return apply_rotary(norm(x) if norm is not None else x, cos, sin)


def window_mask(T: int, L: int, window: int, device) -> torch.Tensor:
    """[T, L]: query t (the last T of L positions) sees the keys at most `window` - 1 positions
    before it, and none after."""
    queries = torch.arange(L - T, L, device=device)
    keys = torch.arange(L, device=device)[None, :]
    return (keys <= queries[:, None]) & (keys > queries[:, None] - window)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """GQA attention of q [T, H, d] over keys/values [L, Hkv, d]; mask [T, L] says what each query
    sees; sinks [H]: each head's extra logit, in the softmax's denominator only."""
    H, Hkv = q.shape[1], keys.shape[1]
    k = keys.repeat_interleave(H // Hkv, dim=1).transpose(0, 1)  # [H, L, d]
    v = values.repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
    if sinks is None:
        return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) * q.shape[-1] ** -0.5  # [H, T, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype)[:, None, None].expand(H, scores.shape[1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v).transpose(0, 1)
