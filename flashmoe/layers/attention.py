"""Gated full attention: per-head q/k RMSNorm, partial RoPE, GQA over a KV cache, output * sigmoid(gate)."""

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .fused import Projections
from .norm import RMSNorm
from .rotary import apply_rotary


class GatedAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        # q_proj yields, per head, [q_h | gate_h]: 2 * head_dim values.
        self.q_proj = nn.Linear(hidden, heads * head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.in_proj = Projections(self, "q_proj", "k_proj", "v_proj")
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """x [T, hidden]; cos/sin [T, rotary_dim]; cache: a KVCache holding the earlier positions."""
        T = x.shape[0]
        q, k, v = self.in_proj(x)
        q, gate = q.view(T, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = k.view(T, self.kv_heads, self.head_dim)
        v = v.view(T, self.kv_heads, self.head_dim)
        fused = kernels.use_kernels(x)
        if fused:
            from ..kernels.rope import norm_rope

            q = norm_rope(q, self.q_norm.weight, cos, sin, self.q_norm.eps)
            k = norm_rope(k, self.k_norm.weight, cos, sin, self.k_norm.eps)
        else:
            q = apply_rotary(self.q_norm(q), cos, sin)
            k = apply_rotary(self.k_norm(k), cos, sin)
        keys, values, mask = cache.update(k, v)  # keys/values [L, kv_heads, head_dim], mask [T, L] or None
        if fused and T == 1:
            from ..kernels.attention_decode import attention_decode

            # No mask needed: inside a graph the kernel reads the last position on the device (and
            # skips the reserved blocks past it); eagerly the cache holds exactly the sequence.
            last = cache.graph_position if cache.graph_position is not None else keys.shape[0] - 1
            return self.o_proj(attention_decode(q[0], gate[0], keys, values, last))
        out = attend(q, keys, values, mask)
        out = out.reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1))
        return self.o_proj(out)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """GQA attention of q [T, H, d] over keys/values [L, Hkv, d]; mask [T, L] says what each query sees."""
    H, Hkv = q.shape[1], keys.shape[1]
    k = keys.repeat_interleave(H // Hkv, dim=1).transpose(0, 1)  # [H, L, d]
    v = values.repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask)
    return out.transpose(0, 1)
