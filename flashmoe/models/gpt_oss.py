"""gpt-oss (`gpt_oss`: gpt-oss-120b, 117B-A5.1B; gpt-oss-20b, 21B-A3.6B): attention in every layer,
alternately over a sliding window of 128 positions and over everything (`layer_types`), with biases
on q/k/v/o, a learned sink logit per head, and YaRN rotary; a router with a bias whose top k logits
are softmaxed (the same weights as softmax over all, then renormalised over the k: what
Routing("softmax") computes); experts with biases and a clamped SwiGLU. Checkpoints call the router
`mlp.router` and store each layer's experts fused, input dimension first ([E, H, 2I] and [E, I, H]),
with gate and up outputs interleaved; the converter turns them into records as every family's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..layers.attention import AttentionSpec
from ..layers.mlp import Swiglu
from ..moe.block import MoESpec
from ..moe.routing import Routing
from .args import CONFIG_FIX, ConfigError, LayerSpec, ModelArgs
from .names import CheckpointNames

NAMES = CheckpointNames(renames=(("mlp.router.", "mlp.gate."),), fused_in_out=True, gate_up_interleaved=True)

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(kw_only=True)
class Args(ModelArgs):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gpt_oss",)
    RELEASED_SCHEME: ClassVar[str | None] = "mxfp4"

    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # of each routed expert
    head_dim: int | None = 64
    rope_theta: float | None = 150000.0
    sliding_window: int | None = 128
    layer_types: list[str] | None = None  # default: sliding, full, sliding, ...
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True

    def check(self) -> None:
        types = self.layer_types
        if types is not None and (len(types) != self.num_hidden_layers or set(types) - set(LAYER_TYPES)):
            raise ConfigError(f"config.json: layer_types must name {self.num_hidden_layers} layers (num_hidden_layers), "
                              f"each one of {', '.join(LAYER_TYPES)}{CONFIG_FIX}")
        super().check()

    def layer(self, i: int) -> LayerSpec:
        kind = self.layer_types[i] if self.layer_types is not None else LAYER_TYPES[i % 2]
        moe = MoESpec(self.num_local_experts, self.num_experts_per_tok, self.intermediate_size, Routing("softmax"),
                      router_bias=True, expert_bias=True, act=Swiglu(self.swiglu_alpha, self.swiglu_limit))
        return LayerSpec("attention", moe, window=self.sliding_window if kind == "sliding_attention" else None)

    def attention(self) -> AttentionSpec:
        return AttentionSpec(self.num_attention_heads, self.num_key_value_heads, self.head_size,
                             qkv_bias=self.attention_bias, o_bias=self.attention_bias, sinks=True)
