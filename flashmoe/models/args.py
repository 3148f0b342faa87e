"""What every family's arguments hold and answer, and how they are read from config.json.

A family's `Args` is a dataclass of exactly the config.json keys it needs, under their Hugging Face
names (unknown keys are ignored; a missing required key is a clear error naming it), plus the
answers the shared layers and the runtime ask of it: the layer plan (`layer`), the attention
variant, the rotary embedding, the MoE blocks' routing. `from_config` builds it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..layers.attention import AttentionSpec
from ..moe.block import MoESpec


class ConfigError(ValueError):
    """A config.json that does not describe a model this family can build (names the key)."""


@dataclass(frozen=True, slots=True)
class DeltaNetSpec:
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One decoder layer: its mixer, and its MLP (a MoESpec, or a dense MLP's intermediate size)."""

    mixer: Literal["attention", "linear_attention"]
    mlp: MoESpec | int


@dataclass(kw_only=True)
class ModelArgs(ABC):
    """The keys every family shares. Subclasses add theirs and implement the methods below."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()  # config.json model_type values this family reads
    ZERO_CENTRED_NORMS: ClassVar[bool] = False  # RMSNorm weights stored as w of (1 + w) (layers/norm.py)

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
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        given = {k: v for k, v in cls.text_config(config).items() if k in names}
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in given
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"config.json is missing the key {missing[0]!r} that a {config.get('model_type')} model needs")
        eos = (generation_config or {}).get("eos_token_id")
        given["generation_eos"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        args = cls(**given)
        args.check()
        return args

    @classmethod
    def text_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The dict holding the text model's keys (a composite VLM config nests it)."""
        return config

    def check(self) -> None:
        """Raise ConfigError for values this family cannot run (each family adds its own)."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported (only silu)")
        rope = self.rope_parameters or self.rope_scaling or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"config.json: rope type {kind!r} is not supported (only 'default' RoPE)")
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

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def rotary(self) -> tuple[int, float]:
        """(rotary_dim, theta): the first rotary_dim values of each head are rotated (NeoX)."""
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0)
        factor = rope.get("partial_rotary_factor", self.partial_rotary_factor)
        return int(self.head_size * (1.0 if factor is None else factor)), float(theta)

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
