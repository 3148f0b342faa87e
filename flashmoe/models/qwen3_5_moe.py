"""Qwen3.5-MoE / Qwen3.6 (`qwen3_5_moe`; the text model of the released VLM checkpoints): 3 Gated
DeltaNet layers to 1 gated-attention layer, a sparse MoE in every layer (softmax routing, always
renormalised, a sigmoid-gated shared expert), zero-centred (1 + w) norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..layers.attention import AttentionSpec
from ..moe.block import MoESpec
from ..moe.routing import Routing
from .args import CONFIG_FIX, ConfigError, DeltaNetSpec, LayerSpec, ModelArgs
from .names import CheckpointNames

NAMES = CheckpointNames(
    skip=(r"model\.visual\.", r"visual\.", r"mtp\.", r"model\.mtp\."),  # the vision tower, the MTP head
    prefixes=("model.language_model.", "language_model.model.", "language_model."),
)


@dataclass(kw_only=True)
class Args(ModelArgs):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen3_5_moe", "qwen3_5_moe_text")  # the VLM's, its text model's
    ZERO_CENTRED_NORMS: ClassVar[bool] = True
    MIXER_TYPES: ClassVar[tuple[str, ...]] = ("linear_attention", "full_attention")  # the layer_types it reads

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    head_dim: int | None = 256
    partial_rotary_factor: float | None = 0.25
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    attention_bias: bool = False

    @classmethod
    def text_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        vlm = config.get("model_type")
        if f"{vlm}_text" not in cls.MODEL_TYPES:  # a text model's own config (or Qwen3-Next's, which has no VLM)
            return config
        text = config.get("text_config") or {}  # the composite VLM config
        if not isinstance(text, dict):
            raise ConfigError(f"config.json: text_config must be an object, not {type(text).__name__}{CONFIG_FIX}")
        text = dict(text)
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
        return {**text, "model_type": vlm}

    def check(self) -> None:
        types = self.mixers()
        if len(types) != self.num_hidden_layers:
            raise ConfigError(f"config.json: layer_types has {len(types)} entries for {self.num_hidden_layers} layers")
        if bad := sorted(set(types) - set(self.MIXER_TYPES)):
            raise ConfigError(f"config.json: unknown layer types {bad}; expected {' / '.join(self.MIXER_TYPES)}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError("config.json: linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.attention_bias:
            raise ConfigError("config.json: attention_bias=true is not part of this family")
        super().check()

    def mixers(self) -> list[str]:
        if self.layer_types is not None:
            return list(self.layer_types)
        every = self.full_attention_interval
        return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(self.num_hidden_layers)]

    def moe_spec(self, norm_topk: bool = True) -> MoESpec:
        return MoESpec(self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size, Routing(norm_topk=norm_topk),
                       self.shared_expert_intermediate_size, shared_gate=True)

    def layer(self, i: int) -> LayerSpec:
        mixer = "linear_attention" if self.mixers()[i] == "linear_attention" else "attention"
        return LayerSpec(mixer, self.moe_spec())

    def attention(self) -> AttentionSpec:
        return AttentionSpec(self.num_attention_heads, self.num_key_value_heads, self.head_size, gated=True, qk_norm="head")

    def deltanet(self) -> DeltaNetSpec:
        return DeltaNetSpec(self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                            self.linear_value_head_dim, self.linear_conv_kernel_dim)
