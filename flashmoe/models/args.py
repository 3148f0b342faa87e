"""What every family's arguments hold and answer, and how they are read from config.json.

A family's `Args` is a dataclass of exactly the config.json keys it needs, under their Hugging Face
names (unknown keys are ignored; a missing required key is a clear error naming it), plus the
answers the shared layers and the runtime ask of it: the layer plan (`layer`), the attention
variant, the rotary embedding, the MoE blocks' routing. `from_config` builds it.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from ..layers.attention import AttentionSpec
from ..layers.hyper import HyperSpec
from ..layers.ple import NgramSpec
from ..layers.rotary import Yarn
from ..moe.block import MoESpec
from ..utils import is_int, short_repr

CONFIG_FIX = "; fetch config.json again from the model's repository"
MAX_LAYERS = 10_000  # far past any model (Qwen3.5-397B has 60): more is a corrupt file, not a list to build


class ConfigError(ValueError):
    """A config.json that does not describe a model this family can build (names the key)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a value of each annotated type must be (annotations are strings: `from __future__ import annotations`).
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", is_int),
    "float": ("a finite number", _is_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "list[int]": ("a list of integers", lambda v: isinstance(v, list) and all(is_int(x) for x in v)),
}
# Sizes, counts and scales the layers divide by or build tensors from: 0 or less fails deep inside.
_POSITIVE = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "rms_norm_eps", "rope_theta",
    "partial_rotary_factor", "full_attention_interval", "n_group", "topk_group", "routed_scaling_factor", "rotary_dim",
    "sliding_window", "swiglu_alpha", "swiglu_limit", "hc_count", "hc_lowrank", "ple_embed_dim", "ple_conv_kernel_size",
    "ngram_size", "heads_per_ngram", "ngram_vocab_size_base", "make_ngram_vocab_size_divisible_by", "split_ngram_parts",
    "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio",
}
_NON_NEGATIVE = {"shared_expert_intermediate_size", "intermediate_size", "n_shared_experts", "first_k_dense_replace"}


def _check_value(key: str, value: Any, annotation: str) -> None:
    """Refuse `value` unless it is one of the annotated types ("int | None", "list[int]", ...)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    names = [_KINDS[k][0] for k in kinds if k in _KINDS]
    if not any(_KINDS[k][1](value) for k in kinds if k in _KINDS):
        raise ConfigError(f"config.json: {key} must be {' or '.join(names)}, not {short_repr(value)}{CONFIG_FIX}")
    if _is_number(value) and (value < 0 or (key in _POSITIVE and value == 0)):
        if key in _POSITIVE or key in _NON_NEGATIVE:
            least = "greater than 0" if key in _POSITIVE else "0 or more"
            raise ConfigError(f"config.json: {key} must be {least}, not {value}{CONFIG_FIX}")


@dataclass(frozen=True, slots=True)
class DeltaNetSpec:
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    output_gate: str = "silu"  # the gated output norm's activation: silu, or sigmoid (Qwen4-Exp's output_gate_type)


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One decoder layer: its mixer, and its MLP (a MoESpec, or a dense MLP's intermediate size)."""

    mixer: Literal["attention", "linear_attention"]
    mlp: MoESpec | int
    window: int | None = None  # attention sees only the last `window` positions (gpt-oss's sliding layers)
    ple: NgramSpec | None = None  # hashed n-gram embeddings added to the residual first (Qwen4-Exp, layers/ple.py)


@dataclass(kw_only=True)
class ModelArgs(ABC):
    """The keys every family shares. Subclasses add theirs and implement the methods below."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()  # config.json model_type values this family reads
    ZERO_CENTRED_NORMS: ClassVar[bool] = False  # RMSNorm weights stored as w of (1 + w) (layers/norm.py)
    RELEASED_SCHEME: ClassVar[str | None] = None  # the experts' quantization as released ("mxfp4": gpt-oss), if any

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rope_parameters: dict | None = None  # transformers 5: {"rope_type", "rope_theta", "partial_rotary_factor"}
    rope_theta: float | None = None  # older configs: the same, as top-level keys
    partial_rotary_factor: float | None = None
    rope_scaling: dict | None = None
    eos_token_id: int | list[int] | None = None
    generation_eos: list[int] = field(default_factory=list)  # from generation_config.json

    # -- built from config.json -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelArgs":
        """The family's arguments from a config.json dict: unknown keys ignored, missing required
        ones named; then `check`."""
        if not isinstance(generation_config, (dict, type(None))):
            raise ConfigError("generation_config.json must hold a JSON object; fetch it again from the model's repository")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        # null is transformers' "unset": the default stands
        given = {k: v for k, v in cls.text_config(config).items() if k in fields and v is not None}
        missing = [name for name, f in fields.items() if name not in given
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"config.json is missing the key {missing[0]!r} that a {config.get('model_type')} model needs")
        for key, value in given.items():
            _check_value(key, value, fields[key].type)
        eos = (generation_config or {}).get("eos_token_id")
        _check_value("eos_token_id (generation_config.json)", eos, "int | list[int] | None")
        given["generation_eos"] = [] if eos is None else [eos] if is_int(eos) else list(eos)
        args = cls(**given)
        if args.num_hidden_layers > MAX_LAYERS:
            raise ConfigError(f"config.json: num_hidden_layers {args.num_hidden_layers} is more than any model has{CONFIG_FIX}")
        args.check()
        return args

    @classmethod
    def text_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The dict holding the text model's keys (a composite VLM config nests it)."""
        return config

    def check_tokenizer(self, tokenizer_size: int, tokenizer_file: Path) -> None:
        """Refuse a tokenizer with more tokens than the model has embedding rows: its last ids would index past them."""
        if tokenizer_size > self.vocab_size:
            raise ConfigError(
                f"{tokenizer_file} has {tokenizer_size} tokens but the model's vocabulary (vocab_size in config.json) has "
                f"{self.vocab_size}, so ids from {self.vocab_size} on have no embedding: use the tokenizer that came with "
                "these weights"
            )

    def check(self) -> None:
        """Raise ConfigError for values this family cannot run (each family adds its own)."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only silu)")
        self.yarn()  # a rope type other than default and yarn, or a yarn without its sizes, fails here
        rotary, _ = self.rotary()
        if not 0 < rotary <= self.head_size or rotary % 2:
            raise ConfigError(f"config.json: the rotary embedding must turn an even number of each head's "
                              f"{self.head_size} values, not {rotary}{CONFIG_FIX}")
        for i in range(self.num_hidden_layers):
            self.layer(i)  # every layer's spec is buildable

    # -- what the layers and the runtime ask -------------------------------------------------------
    @abstractmethod
    def layer(self, i: int) -> LayerSpec:
        """Layer i's mixer and MLP."""

    @abstractmethod
    def attention(self) -> AttentionSpec:
        """The full-attention layers' shape and variant."""

    def deltanet(self) -> DeltaNetSpec:
        raise ConfigError(f"{self.model_type} models have no linear-attention layers")

    def hyper_connections(self) -> HyperSpec | None:
        """The residual's streams where it has several (Qwen4-Exp, layers/hyper.py); None: one residual, normed."""
        return None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def rotary(self) -> tuple[int, float]:
        """(rotary_dim, theta): the first rotary_dim values of each head are rotated (NeoX)."""
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0)
        factor = rope.get("partial_rotary_factor", self.partial_rotary_factor)
        return int(self.head_size * (1.0 if factor is None else factor)), float(theta)

    def yarn(self) -> Yarn | None:
        """YaRN's parameters where the rope type is yarn (gpt-oss); None for plain RoPE."""
        rope = self.rope_parameters or self.rope_scaling or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            return None
        if kind != "yarn":
            raise ConfigError(f"config.json: rope type {kind!r} is not supported (only 'default' and 'yarn')")
        original = rope.get("original_max_position_embeddings")
        factor = rope.get("factor") or (self.max_position_embeddings / original if is_int(original) and original > 0 else None)
        if not (is_int(original) and original > 0 and _is_number(factor) and factor > 0):
            raise ConfigError("config.json: a yarn rope needs original_max_position_embeddings (a count) and factor "
                              f"(a number above 0), not {short_repr(original)} and {short_repr(factor)}{CONFIG_FIX}")
        numbers = {}
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            value = rope.get(key)
            if value is not None and not (_is_number(value) and value > 0):
                raise ConfigError(f"config.json: the yarn rope's {key} must be a number above 0, not {short_repr(value)}{CONFIG_FIX}")
            numbers[key] = value
        return Yarn(float(factor), original, beta_fast=numbers["beta_fast"] or 32.0, beta_slow=numbers["beta_slow"] or 1.0,
                    truncate=bool(rope.get("truncate", True)), attention_factor=numbers["attention_factor"],
                    mscale=numbers["mscale"], mscale_all_dim=numbers["mscale_all_dim"])

    @property
    def eos_token_ids(self) -> list[int]:
        if self.generation_eos:
            return self.generation_eos
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if isinstance(self.layer(i).mlp, MoESpec)]

    @property
    def moe(self) -> MoESpec:
        """The MoE layers' spec (one per model: every MoE layer has the same experts)."""
        moe = [self.layer(i).mlp for i in self.moe_layers]
        if not moe:
            raise ConfigError(f"this {self.model_type} config has no MoE layers")
        return moe[0]
