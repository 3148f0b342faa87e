"""The one typed model configuration, read from a Hugging Face `config.json`.

Supported: `qwen3_5_moe` (the composite VLM config; the text model sits under `text_config`),
`qwen3_5_moe_text` and `qwen3_next`. Both families share one set of fields; Qwen3-Next adds
dense-MLP layers (`mlp_only_layers`, `decoder_sparse_step`) and an optional top-k renormalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")


class UnsupportedModelError(ValueError):
    pass


@dataclass(slots=True)
class ModelConfig:
    model_type: str  # "qwen3_5_moe" or "qwen3_next": the family, after unwrapping the VLM config
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool = True
    intermediate_size: int = 0  # dense MLP layers (Qwen3-Next only)
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config.json: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.layer_types) - {"linear_attention", "full_attention"})
        if bad:
            raise ValueError(f"config.json: unknown layer types {bad}; expected linear_attention / full_attention")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("config.json: linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("config.json: num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        if self.num_experts == 0 or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_dict(cls, raw: dict, generation_config: dict | None = None) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; flashmoe runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Qwen3.5-MoE and Qwen3-Next checkpoints)"
            )
        text = raw
        if model_type == "qwen3_5_moe":
            text = dict(raw.get("text_config") or {})
            # The composite config may carry tie_word_embeddings at the top level only.
            text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        family = "qwen3_next" if model_type == "qwen3_next" else "qwen3_5_moe"
        try:
            return cls._from_text_config(family, text, generation_config or {})
        except KeyError as e:
            raise ValueError(f"config.json is missing the key {e.args[0]!r} that a {model_type} model needs") from None

    @classmethod
    def _from_text_config(cls, family: str, c: dict, generation_config: dict) -> "ModelConfig":
        n_layers = c["num_hidden_layers"]
        layer_types = c.get("layer_types")
        if layer_types is None:
            interval = c.get("full_attention_interval", 4)
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (only 'default' RoPE)")
        if c.get("attention_bias", False):
            raise UnsupportedModelError("attention_bias=true is not supported by the Qwen3.5/Qwen3-Next models")
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        eos = generation_config.get("eos_token_id", c.get("eos_token_id"))
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        return cls(
            model_type=family,
            vocab_size=c["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or hidden // heads,
            layer_types=list(layer_types),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            partial_rotary_factor=rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25)),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            linear_conv_kernel_dim=c.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=c.get("linear_key_head_dim", 128),
            linear_value_head_dim=c.get("linear_value_head_dim", 128),
            linear_num_key_heads=c.get("linear_num_key_heads", 16),
            linear_num_value_heads=c.get("linear_num_value_heads", 32),
            num_experts=c["num_experts"],
            num_experts_per_tok=c["num_experts_per_tok"],
            moe_intermediate_size=c["moe_intermediate_size"],
            shared_expert_intermediate_size=c["shared_expert_intermediate_size"],
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            intermediate_size=c.get("intermediate_size", 0) if family == "qwen3_next" else 0,
            mlp_only_layers=list(c.get("mlp_only_layers") or []) if family == "qwen3_next" else [],
            decoder_sparse_step=c.get("decoder_sparse_step", 1) if family == "qwen3_next" else 1,
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: point at a Hugging Face model directory with a config.json")
        raw = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else None
        return cls.from_dict(raw, gen)
