"""Per-sequence decoding state: a KV cache per attention layer, conv window + recurrent state per
linear-attention layer, and the position. Cloneable, so a prefix can be reused by the next turn."""

from __future__ import annotations

import copy

import torch

from ..config import ModelConfig


class KVCache:
    """Keys and values of one attention layer; storage grows by doubling, so appends are amortised O(T)."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 256):
        self.k = torch.empty(capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[0]
        if end > self.k.shape[0]:
            cap = max(end, 2 * self.k.shape[0])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty(cap, *old.shape[1:])
                new[: self.length] = old[: self.length]
                setattr(self, name, new)
        self.k[self.length : end] = k
        self.v[self.length : end] = v
        self.length = end
        return self.k[:end], self.v[:end]

    @property
    def nbytes(self) -> int:
        return 2 * self.length * self.k[0].numel() * self.k.element_size()


class LinearState:
    """Gated DeltaNet state: the last kernel-1 conv inputs and the fp32 recurrent state [Hv, dk, dv]."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device):
        conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
        self.conv = torch.zeros(cfg.linear_conv_kernel_dim - 1, conv_dim, dtype=dtype, device=device)
        self.recurrent = torch.zeros(
            cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim, dtype=torch.float32, device=device
        )

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4


class SequenceState:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device):
        self.position = 0
        self.layers = [
            LinearState(cfg, dtype, device) if t == "linear_attention" else KVCache(cfg.num_key_value_heads, cfg.head_dim, dtype, device)
            for t in cfg.layer_types
        ]

    def clone(self) -> "SequenceState":
        return copy.deepcopy(self)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
