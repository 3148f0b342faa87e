"""Qwen3-Next: the Qwen3.5-MoE model with the linear-attention input projections fused per key head.

Its checkpoints store in_proj_qkvz [k_heads * (2 dk + 2 r dv), H] and in_proj_ba [k_heads * 2r, H]
(r = value heads per key head), grouped by key head. `sanitize` reorders those rows into the
Qwen3.5 tensors (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a): a pure permutation, so the same
model code runs both families exactly.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .qwen3_5_moe import Model, canonical_name, parse_expert_name  # noqa: F401  (the family's shared parts)


def sanitize(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    nk, dk, dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // nk
    hidden = tensor.shape[-1]
    if name.endswith("linear_attn.in_proj_qkvz.weight"):
        grouped = tensor.view(nk, 2 * dk + 2 * r * dv, hidden)
        q, k, v, z = grouped.split([dk, dk, r * dv, r * dv], dim=1)
        qkv = torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])
        base = name[: -len("in_proj_qkvz.weight")]
        return [(base + "in_proj_qkv.weight", qkv), (base + "in_proj_z.weight", z.reshape(-1, hidden))]
    if name.endswith("linear_attn.in_proj_ba.weight"):
        b, a = tensor.view(nk, 2 * r, hidden).split([r, r], dim=1)
        base = name[: -len("in_proj_ba.weight")]
        return [(base + "in_proj_b.weight", b.reshape(-1, hidden)), (base + "in_proj_a.weight", a.reshape(-1, hidden))]
    return [(name, tensor)]
