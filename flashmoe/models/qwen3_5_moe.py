"""Qwen3.5-MoE (text model): 3 Gated DeltaNet layers to 1 gated-attention layer, a sparse MoE in
every layer. Module names equal the checkpoint's tensor names, so dense weights load by name.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..layers.attention import GatedAttention
from ..layers.deltanet import GatedDeltaNet
from ..layers.moe import MLP, SparseMoE
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


class NullTimer:
    """Stand-in for runtime timing: the model marks sections, the runtime decides what to do with them."""

    def section(self, name: str):
        return _NULL_SECTION


class _NullSection:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_SECTION = _NullSection()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.is_linear = cfg.layer_types[index] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(
                cfg.hidden_size,
                cfg.linear_num_key_heads,
                cfg.linear_num_value_heads,
                cfg.linear_key_head_dim,
                cfg.linear_value_head_dim,
                cfg.linear_conv_kernel_dim,
                cfg.rms_norm_eps,
            )
        else:
            self.self_attn = GatedAttention(
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
            )
        if cfg.is_moe_layer(index):
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.shared_expert_intermediate_size,
                cfg.norm_topk_prob,
            )
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Set by the runtime to prefetch: residual [T, H] -> the next MoE layer's guessed ids [T, k]
        # (or None). Not a module: it only borrows the next layer's norm and router.
        self.predict_next: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x, cos, sin, cache, timer) -> torch.Tensor:
        x, h, weights, ids = self.dense(x, cos, sin, cache, timer)
        return x if ids is None else x + self.mlp.experts(h, ids, weights)

    def dense(self, x, cos, sin, cache, timer):
        """All of the layer but the routed experts -> (x with mixer and shared expert (or dense MLP)
        added, the normed input of the experts, routing weights, expert ids); ids is None for a
        dense-MLP layer. The split is where the host must look at the routing. With a
        `predict_next`, ids [T, 2k] also carry the next MoE layer's guessed ids, so the one read of
        this layer's routing brings both."""
        with timer.section("mixer"):
            h = self.input_layernorm(x)
            h = self.linear_attn(h, cache) if self.is_linear else self.self_attn(h, cos, sin, cache)
            x, h = self.post_attention_layernorm.add(x, h)  # x + h and its norm
        if not isinstance(self.mlp, SparseMoE):
            with timer.section("dense_mlp"):
                return x + self.mlp(h), h, None, None
        with timer.section("routing"):  # the router's matmul also computes the shared expert's inputs
            logits, *shared_inputs = self.mlp.in_proj(h)
            weights, ids = self.mlp.route(logits)
        with timer.section("shared_expert"):
            x = self.mlp.add_shared(x, *shared_inputs)
        if self.predict_next is not None and (guess := self.predict_next(x)) is not None:
            with timer.section("routing"):
                ids = torch.cat([ids, guess], dim=-1)
        return x, h, weights, ids


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)

    def fuse_projections(self) -> None:
        """Run the projections that read one input as one matmul (layers/fused.py). Once, after the
        weights are loaded onto their device (and after any Int8Linear swap)."""
        for layer in self.layers:
            mixer = layer.linear_attn if layer.is_linear else layer.self_attn
            for module in (mixer, layer.mlp):
                module.in_proj.fuse()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, ids: torch.Tensor, state, timer=None, last_only: bool = True) -> torch.Tensor:
        """ids [T] continue the sequence held in `state` (updated in place) -> logits [1 or T, vocab] (fp32)."""
        timer = timer or NullTimer()
        positions = torch.arange(state.position, state.position + ids.shape[0], device=ids.device)
        cos, sin = self.rotary(positions)
        x = self.model.embed_tokens(ids)
        for layer, cache in zip(self.model.layers, state.layers):
            x = layer(x, cos, sin, cache, timer)
        state.position += ids.shape[0]
        with timer.section("head"):
            return self.logits(x[-1:] if last_only else x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.norm(x)
        if self.cfg.tie_word_embeddings:  # the embedding table, kept 16-bit even with --dense-bits 8
            return (x @ self.model.embed_tokens.weight.t()).float()
        return self.lm_head(x).float()  # an nn.Linear, or an Int8Linear with --dense-bits 8


# --- checkpoint names ----------------------------------------------------------------------------

_SKIP = re.compile(r"^(model\.visual\.|visual\.|mtp\.|model\.mtp\.)")
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_FUSED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_SPLIT_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def canonical_name(name: str) -> str | None:
    """A checkpoint tensor name in this package's naming, or None for tensors the text model never uses
    (the released VLM's vision tower `model.visual.*` and the multi-token-prediction head `mtp.*`)."""
    if _SKIP.match(name):
        return None
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name


def parse_expert_name(name: str) -> tuple[int, int | None, str] | None:
    """(layer, expert or None for fused [E, ...] tensors, projection) for an expert tensor, else None."""
    m = _FUSED_EXPERT.match(name)
    if m:
        return int(m[1]), None, m[2]
    m = _SPLIT_EXPERT.match(name)
    if m:
        return int(m[1]), int(m[2]), m[3]
    return None


def sanitize(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Dense checkpoint tensor -> the tensors this model's modules hold (identity for Qwen3.5)."""
    return [(name, tensor)]
