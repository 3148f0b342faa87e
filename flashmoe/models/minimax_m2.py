"""MiniMax-M2.x (`minimax_m2`, 230B-A10B): full attention in every layer (GQA, q/k RMSNorm across
all heads, partial rotary), sigmoid routing chosen with a correction bias and always renormalised,
no shared expert. Checkpoints call the MoE block `block_sparse_moe` and an expert's projections
w1 (gate), w3 (up), w2 (down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..layers.attention import AttentionSpec
from ..moe.block import MoESpec
from ..moe.routing import Routing
from .args import LayerSpec, ModelArgs
from .names import CheckpointNames

NAMES = CheckpointNames(
    renames=(("block_sparse_moe.", "mlp."),),
    expert_projections={"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
)


@dataclass(kw_only=True)
class Args(ModelArgs):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("minimax_m2",)

    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # of each routed expert
    head_dim: int | None = 128
    rope_theta: float | None = 5e6
    rotary_dim: int | None = None  # the released configs' way to say partial_rotary_factor

    def rotary(self) -> tuple[int, float]:
        dim, theta = super().rotary()
        if self.rotary_dim is not None and "partial_rotary_factor" not in (self.rope_parameters or {}):
            dim = self.rotary_dim
        return dim, theta

    def layer(self, i: int) -> LayerSpec:
        routing = Routing("sigmoid", norm_topk=True, correction_bias=True)
        return LayerSpec("attention", MoESpec(self.num_local_experts, self.num_experts_per_tok, self.intermediate_size, routing))

    def attention(self) -> AttentionSpec:
        return AttentionSpec(self.num_attention_heads, self.num_key_value_heads, self.head_size, qk_norm="all")
