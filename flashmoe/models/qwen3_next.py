"""Qwen3-Next (`qwen3_next`): the Qwen3.5-MoE model with dense-MLP layers where the config says
(`mlp_only_layers`, `decoder_sparse_step`), an optional top-k renormalisation, and the linear-
attention input projections fused per key head.

Its checkpoints store in_proj_qkvz [k_heads * (2 dk + 2 r dv), H] and in_proj_ba [k_heads * 2r, H]
(r = value heads per key head), grouped by key head. `sanitize` reorders those rows into the
Qwen3.5 tensors (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a): a pure permutation, so the same
layers run both families exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import qwen3_5_moe
from .args import LayerSpec
from .names import CheckpointNames

NAMES = CheckpointNames(skip=(r"mtp\.", r"model\.mtp\."))


@dataclass(kw_only=True)
class Args(qwen3_5_moe.Args):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_next",)

    intermediate_size: int = 5632
    norm_topk_prob: bool = True
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1

    def layer(self, i: int) -> LayerSpec:
        spec = super().layer(i)
        if i in self.mlp_only_layers or (i + 1) % self.decoder_sparse_step:
            return LayerSpec(spec.mixer, self.intermediate_size)
        return LayerSpec(spec.mixer, self.moe_spec(self.norm_topk_prob))


def sanitize(args: Args, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    nk, dk, dv = args.linear_num_key_heads, args.linear_key_head_dim, args.linear_value_head_dim
    r = args.linear_num_value_heads // nk
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
