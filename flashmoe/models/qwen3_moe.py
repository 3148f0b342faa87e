"""Qwen3-MoE (`qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B): full attention
in every layer (GQA, q/k RMSNorm per head, full rotary), softmax routing without a shared expert,
dense-MLP layers where the config says (`mlp_only_layers`, `decoder_sparse_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


from ..layers.attention import AttentionSpec
from ..moe.block import MoESpec
from ..moe.routing import Routing
from .args import ConfigError, LayerSpec, ModelArgs
from .names import CheckpointNames

NAMES = CheckpointNames()


@dataclass(kw_only=True)
class Args(ModelArgs):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_moe",)

    num_experts: int | None = None  # released configs; transformers writes num_local_experts
    num_local_experts: int | None = None
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int = 6144
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    attention_bias: bool = False
    use_sliding_window: bool = False

    def check(self) -> None:
        if self.num_experts is None and self.num_local_experts is None:
            raise ConfigError("config.json is missing the key 'num_experts' that a qwen3_moe model needs")
        if self.use_sliding_window:
            raise ConfigError("config.json: use_sliding_window=true (windowed attention) is not supported for qwen3_moe")
        super().check()

    def layer(self, i: int) -> LayerSpec:
        if i in self.mlp_only_layers or (i + 1) % self.decoder_sparse_step:
            return LayerSpec("attention", self.intermediate_size)
        experts = self.num_experts if self.num_experts is not None else self.num_local_experts
        return LayerSpec("attention", MoESpec(experts, self.num_experts_per_tok, self.moe_intermediate_size,
                                              Routing(norm_topk=self.norm_topk_prob)))

    def attention(self) -> AttentionSpec:
        return AttentionSpec(self.num_attention_heads, self.num_key_value_heads, self.head_size, qk_norm="head",
                             qkv_bias=self.attention_bias, o_bias=self.attention_bias)


