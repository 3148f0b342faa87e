"""Qwen4-Exp (`qwen4_exp`; `qwen4_exp_text` for the text model alone; Qwen3.8-Flash-Next's text
model): Qwen3.5-MoE's layers (Gated DeltaNet and gated attention from `layer_types`, the same MoE
block, zero-centred norms) and three additions: a residual of `hc_count` streams mixed before every
block (hyper-connections, layers/hyper.py), hashed n-gram embeddings added to the streams before
the `ple_layer_ids` layers (one-indexed; layers/ple.py), and QSA on every attention layer, a token
indexer choosing the key blocks each query sees up to a budget (layers/indexer.py; its releases
call these layers full_attention, transformers indexed_attention). The vision tower and the MTP
head are skipped. The n-gram tables stay in the row blocks the checkpoint stores; the hash's
constants are recomputed from config.json, and `sanitize` checks the stored ones against them.
"""

from __future__ import annotations

import re
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..layers.attention import AttentionSpec
from ..layers.hyper import HyperSpec
from ..layers.indexer import IndexerSpec
from ..layers.ple import NgramSpec, hash_multipliers, head_table_sizes
from . import qwen3_5_moe
from .args import CONFIG_FIX, ConfigError, DeltaNetSpec, LayerSpec

NAMES = qwen3_5_moe.NAMES

HASH_CONSTANTS = re.compile(r"model\.layers\.(\d+)\.ple\.ple_embedding\.(layer_multipliers|ngram_heads_vocab_sizes|ngram_heads_offsets)")
INDEXER_KEYS = ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio")


@dataclass(kw_only=True)
class Args(qwen3_5_moe.Args):
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen4_exp", "qwen4_exp_text")
    MIXER_TYPES: ClassVar[tuple[str, ...]] = ("linear_attention", "indexed_attention", "full_attention")

    hc_count: int = 4
    hc_lowrank: int = 320
    ple_layer_ids: list[int] | None = None
    ple_embed_dim: int | None = None  # default hidden_size
    ple_conv_kernel_size: int = 4
    ngram_size: int = 3
    heads_per_ngram: int = 8
    ngram_vocab_size_base: int = 20_000_000
    make_ngram_vocab_size_divisible_by: int = 128
    seed: int = 1234
    split_ngram_parts: int = 512
    indexer_n_heads: int | None = None
    indexer_kv_heads: int | None = None
    indexer_head_dim: int | None = None
    indexer_budget: int | None = None
    indexer_compress_ratio: int | None = None
    norm_topk_prob: bool = True
    output_gate_type: str | None = None  # the DeltaNet output gate's activation; default hidden_act

    def check(self) -> None:
        if self.hc_count < 2:
            raise ConfigError(f"config.json: hc_count must be 2 or more (the residual's streams), not {self.hc_count}{CONFIG_FIX}")
        if (gate := self.output_gate_type or self.hidden_act) not in ("silu", "sigmoid"):
            raise ConfigError(f"config.json: output_gate_type {gate!r} is not supported (silu or sigmoid){CONFIG_FIX}")
        layers = self.num_hidden_layers
        if bad := [i for i in self.ple_layer_ids or [] if not 1 <= i <= layers]:
            raise ConfigError(f"config.json: ple_layer_ids {bad} are not layers: they count from 1 to num_hidden_layers "
                              f"({layers}){CONFIG_FIX}")
        if self.ple_layer_ids:
            heads = (self.ngram_size - 1) * self.heads_per_ngram
            if heads < 1 or self.ple_dim % heads:
                raise ConfigError(f"config.json: ple_embed_dim ({self.ple_dim}) must split evenly over the n-gram heads, "
                                  f"(ngram_size - 1) * heads_per_ngram = {heads} (ngram_size 2 or more){CONFIG_FIX}")
            if not self.eos_token_id and self.eos_token_id != 0:
                raise ConfigError(f"config.json: eos_token_id must be set: the n-gram embeddings start documents at it{CONFIG_FIX}")
        self._check_indexer()
        super().check()  # the layer types, then every layer's spec (PLE on linear-attention layers only)

    def _check_indexer(self) -> None:
        if all(t == "linear_attention" for t in self.mixers()):
            return
        if missing := [key for key in INDEXER_KEYS if getattr(self, key) is None]:
            raise ConfigError(f"config.json: the attention layers' QSA indexer needs {', '.join(missing)}{CONFIG_FIX}")
        if self.indexer_kv_heads != 1:
            raise ConfigError(f"config.json: indexer_kv_heads must be 1 (one index key per position), not {self.indexer_kv_heads}")
        if self.indexer_budget % self.indexer_compress_ratio:
            raise ConfigError(f"config.json: indexer_budget ({self.indexer_budget}) must be a multiple of "
                              f"indexer_compress_ratio ({self.indexer_compress_ratio}): it is spent in whole blocks{CONFIG_FIX}")
        if (rotary := self.rotary()[0]) > self.indexer_head_dim:
            raise ConfigError(f"config.json: the rotary embedding turns {rotary} values per head, more than indexer_head_dim "
                              f"({self.indexer_head_dim}) holds{CONFIG_FIX}")

    @property
    def ple_dim(self) -> int:
        return self.ple_embed_dim or self.hidden_size

    def ple(self, i: int) -> NgramSpec | None:
        """Layer i's per-layer embedding, where ple_layer_ids names it."""
        ids = sorted(set(self.ple_layer_ids or []))
        if i + 1 not in ids:
            return None
        if self.mixers()[i] != "linear_attention":
            raise ConfigError(f"config.json: ple_layer_ids names layer {i + 1} (counting from 1), a {self.mixers()[i]} "
                              "layer; per-layer embeddings go on linear_attention layers only")
        eos = self.eos_token_id[0] if isinstance(self.eos_token_id, list) else self.eos_token_id
        return NgramSpec(self.ngram_size, self.heads_per_ngram, self.ple_dim, self.ple_conv_kernel_size, self.vocab_size,
                         self.ngram_vocab_size_base, self.make_ngram_vocab_size_divisible_by, self.seed, ids.index(i + 1),
                         eos, self.split_ngram_parts)

    def layer(self, i: int) -> LayerSpec:
        mixer = "linear_attention" if self.mixers()[i] == "linear_attention" else "attention"
        return LayerSpec(mixer, self.moe_spec(self.norm_topk_prob), ple=self.ple(i))

    def attention(self) -> AttentionSpec:
        indexer = IndexerSpec(self.indexer_n_heads, self.indexer_head_dim, self.indexer_budget, self.indexer_compress_ratio)
        return AttentionSpec(self.num_attention_heads, self.num_key_value_heads, self.head_size, gated=True, qk_norm="head",
                             indexer=indexer)

    def hyper_connections(self) -> HyperSpec:
        return HyperSpec(self.hc_count, self.hc_lowrank)

    def deltanet(self) -> DeltaNetSpec:
        return dataclasses.replace(super().deltanet(), output_gate=self.output_gate_type or self.hidden_act)


def sanitize(args: Args, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The n-gram hash's constants are not stored: the model derives them from config.json. A
    checkpoint whose stored ones differ was hashed otherwise, and its tables would be read at the
    wrong rows."""
    found = HASH_CONSTANTS.fullmatch(name)
    if found is None:
        return [(name, tensor)]
    spec = args.layer(int(found[1])).ple if int(found[1]) < args.num_hidden_layers else None
    if spec is None:
        raise ConfigError(f"the checkpoint holds {name}, but config.json's ple_layer_ids do not name layer {int(found[1]) + 1}")
    if not tensor.is_meta:  # shapes alone are planned first
        sizes = head_table_sizes(spec)
        expected = {"layer_multipliers": hash_multipliers(spec), "ngram_heads_vocab_sizes": sizes,
                    "ngram_heads_offsets": [sum(sizes[:h]) for h in range(len(sizes))]}[found[2]]
        if tensor.tolist() != expected:
            raise ConfigError(f"{name} holds {tensor.tolist()}, but config.json's n-gram settings give {expected}: "
                              "is config.json the one that belongs to these weights?")
    return []
