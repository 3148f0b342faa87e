"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`, 355B-A32B; Air 106B-A12B): full attention in every layer (GQA,
biases on q/k/v, optional q/k RMSNorm per head, partial rotary), the first `first_k_dense_replace`
layers dense, then sigmoid routing with a correction bias, expert groups and a routed scaling
factor (the router's matmul in fp32), and one shared expert added unscaled. Checkpoints append the
multi-token-prediction layer after the last layer (skipped) and call the shared expert
`shared_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..layers.attention import AttentionSpec
from ..moe.block import MoESpec
from ..moe.routing import Routing
from .args import LayerSpec, ModelArgs
from .names import CheckpointNames

NAMES = CheckpointNames(renames=(
    ("mlp.shared_experts.", "mlp.shared_expert."),
    ("mlp.gate.e_score_correction_bias", "mlp.e_score_correction_bias"),
))


@dataclass(kw_only=True)
class Args(ModelArgs):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("glm4_moe",)

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int = 10944  # the dense layers' MLP
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    partial_rotary_factor: float | None = 0.5

    def layer(self, i: int) -> LayerSpec:
        if i < self.first_k_dense_replace:
            return LayerSpec("attention", self.intermediate_size)
        routing = Routing("sigmoid", self.norm_topk_prob, correction_bias=True, n_group=self.n_group,
                          topk_group=self.topk_group, scaling=self.routed_scaling_factor)
        return LayerSpec("attention", MoESpec(self.n_routed_experts, self.num_experts_per_tok, self.moe_intermediate_size,
                                              routing, self.moe_intermediate_size * self.n_shared_experts, router_fp32=True))

    def attention(self) -> AttentionSpec:
        return AttentionSpec(self.num_attention_heads, self.num_key_value_heads, self.head_size,
                             qk_norm="head" if self.use_qk_norm else None, qkv_bias=self.attention_bias)
