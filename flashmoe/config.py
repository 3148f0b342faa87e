"""The one typed model configuration, read from a Hugging Face `config.json`.

Supported: `qwen3_5_moe` (the composite VLM config; the text model sits under `text_config`),
`qwen3_5_moe_text` and `qwen3_next`. Both families share one set of fields; Qwen3-Next adds
dense-MLP layers (`mlp_only_layers`, `decoder_sparse_step`) and an optional top-k renormalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .utils import is_int, read_json, short_repr

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
CONFIG_FIX = "; fetch config.json again from the model's repository"


class UnsupportedModelError(ValueError):
    pass


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a value of each field type must be (annotations are strings here: `from __future__ import annotations`).
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", is_int),
    "float": ("a finite number", _is_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "list[int]": ("a list of integers", lambda v: isinstance(v, list) and all(is_int(x) for x in v)),
}
# Sizes and counts the model divides by or builds tensors from: 0 or less fails deep inside it.
_POSITIVE = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "decoder_sparse_step", "rms_norm_eps", "rope_theta", "partial_rotary_factor",
)
_NON_NEGATIVE = ("shared_expert_intermediate_size", "intermediate_size")
MAX_LAYERS = 10_000  # far past any model (Qwen3.5-397B has 60): more is a corrupt file, not a list to build


def _check_kind(key: str, value: Any, kind: str) -> None:
    """Refuse `value` unless it is of `kind` (a _KINDS key)."""
    name, ok = _KINDS[kind]
    if not ok(value):
        raise ValueError(f"config.json: {key} must be {name}, not {short_repr(value)}{CONFIG_FIX}")


def _checked(c: dict, key: str, kind: str, default: Any = None) -> Any:
    """c[key] checked to be of `kind`, or `default` when it is absent or null (HF's "unset")."""
    value = c.get(key)
    if value is None:
        return default
    _check_kind(key, value, kind)
    return value


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
        for f in fields(self):
            _check_kind(f.name, getattr(self, f.name), f.type)
        for name in _POSITIVE + _NON_NEGATIVE:
            if getattr(self, name) < 0 or (name in _POSITIVE and getattr(self, name) == 0):
                least = "greater than 0" if name in _POSITIVE else "0 or more"
                raise ValueError(f"config.json: {name} must be {least}, not {getattr(self, name)}{CONFIG_FIX}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"config.json: num_experts_per_tok {self.num_experts_per_tok} is more than num_experts {self.num_experts}"
                f"{CONFIG_FIX}"
            )
        if self.partial_rotary_factor > 1 or self.rotary_dim % 2:
            raise ValueError(
                f"config.json: partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} must rotate an "
                f"even number of dimensions, at most head_dim{CONFIG_FIX}"
            )
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

    def check_tokenizer(self, tokenizer_size: int, tokenizer_file: Path) -> None:
        """Refuse a tokenizer with more tokens than the model has embedding rows: its last ids would index past them."""
        if tokenizer_size > self.vocab_size:
            raise ValueError(
                f"{tokenizer_file} has {tokenizer_size} tokens but the model's vocabulary (vocab_size in config.json) has "
                f"{self.vocab_size}, so ids from {self.vocab_size} on have no embedding: use the tokenizer that came with "
                "these weights"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        if layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_dict(cls, raw: Any, generation_config: Any = None) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"config.json must hold a JSON object, not {type(raw).__name__}{CONFIG_FIX}")
        if not isinstance(generation_config, (dict, type(None))):
            raise ValueError("generation_config.json must hold a JSON object; fetch it again from the model's repository")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; flashmoe runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Qwen3.5-MoE and Qwen3-Next checkpoints)"
            )
        text = raw
        if model_type == "qwen3_5_moe":
            text = dict(_checked(raw, "text_config", "dict", {}))
            # The composite config may carry tie_word_embeddings at the top level only.
            text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        family = "qwen3_next" if model_type == "qwen3_next" else "qwen3_5_moe"
        try:
            return cls._from_text_config(family, text, generation_config or {})
        except KeyError as e:
            raise ValueError(f"config.json is missing the key {e.args[0]!r} that a {model_type} model needs") from None

    @classmethod
    def _from_text_config(cls, family: str, c: dict, generation_config: dict) -> "ModelConfig":
        n_layers = _checked(c, "num_hidden_layers", "int", 0)
        layer_types = c.get("layer_types")
        if layer_types is None:
            interval = _checked(c, "full_attention_interval", "int", 4)
            if interval < 1:
                raise ValueError(f"config.json: full_attention_interval must be at least 1, not {interval}{CONFIG_FIX}")
            if n_layers > MAX_LAYERS:
                raise ValueError(f"config.json: num_hidden_layers {n_layers} is more than any model has{CONFIG_FIX}")
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
        rope = _checked(c, "rope_parameters", "dict") or _checked(c, "rope_scaling", "dict") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (only 'default' RoPE)")
        if c.get("attention_bias", False):
            raise UnsupportedModelError("attention_bias=true is not supported by the Qwen3.5/Qwen3-Next models")
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        eos = generation_config.get("eos_token_id", c.get("eos_token_id"))
        eos_ids = [] if eos is None else ([eos] if is_int(eos) else eos)
        hidden, heads = _checked(c, "hidden_size", "int", 0), _checked(c, "num_attention_heads", "int", 0)
        return cls(
            model_type=family,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or (hidden // heads if heads else 0),
            layer_types=layer_types,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            partial_rotary_factor=rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25)),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            linear_conv_kernel_dim=c.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=c.get("linear_key_head_dim", 128),
            linear_value_head_dim=c.get("linear_value_head_dim", 128),
            linear_num_key_heads=c.get("linear_num_key_heads", 16),
            linear_num_value_heads=c.get("linear_num_value_heads", 32),
            num_experts=c["num_experts"],
            num_experts_per_tok=c["num_experts_per_tok"],
            moe_intermediate_size=c["moe_intermediate_size"],
            shared_expert_intermediate_size=c["shared_expert_intermediate_size"],
            norm_topk_prob=c.get("norm_topk_prob", True),
            intermediate_size=c.get("intermediate_size", 0) if family == "qwen3_next" else 0,
            mlp_only_layers=(c.get("mlp_only_layers") or []) if family == "qwen3_next" else [],
            decoder_sparse_step=c.get("decoder_sparse_step", 1) if family == "qwen3_next" else 1,
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: point at a Hugging Face model directory with a config.json")
        gen_file = path / "generation_config.json"
        gen = read_json(gen_file, fix="; fetch it again from the model's repository") if gen_file.exists() else None
        return cls.from_dict(read_json(cfg_file, fix=CONFIG_FIX), gen)
