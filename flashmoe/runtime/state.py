"""Per-sequence decoding state: a KV cache per attention layer, conv window + recurrent state per
linear-attention layer, and the position. Cloneable, so a prefix can be reused by the next turn."""

from __future__ import annotations

import copy

import torch

from ..config import ModelConfig


class KVCache:
    """Keys and values of one attention layer; storage grows by doubling, so appends are amortised O(T).

    Eager use appends at `length`. While a CUDA graph replays the decode step, the write position
    is the device tensor `graph_position` instead (set by runtime/graphs.py) and attention runs
    over the whole buffer, masked beyond that position: shapes stay fixed, as graphs need."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 256):
        self.k = torch.zeros(capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.graph_position: torch.Tensor | None = None

    def reserve(self, capacity: int) -> None:
        if capacity > self.k.shape[0]:
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(capacity, *old.shape[1:])
                new[: self.length] = old[: self.length]
                setattr(self, name, new)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new keys/values; return (keys, values, mask) for attention over the sequence."""
        if self.graph_position is not None:
            self.k.index_copy_(0, self.graph_position, k)
            self.v.index_copy_(0, self.graph_position, v)
            mask = torch.arange(self.k.shape[0], device=k.device)[None, :] <= self.graph_position[:, None]
            return self.k, self.v, mask
        start, end = self.length, self.length + k.shape[0]
        if end > self.k.shape[0]:
            self.reserve(max(end, 2 * self.k.shape[0]))
        self.k[start:end] = k
        self.v[start:end] = v
        self.length = end
        mask = None
        if k.shape[0] > 1:  # query i (position start + i) sees keys 0 .. start + i
            mask = torch.arange(end, device=k.device)[None, :] <= (start + torch.arange(k.shape[0], device=k.device))[:, None]
        return self.k[:end], self.v[:end], mask

    @property
    def nbytes(self) -> int:
        return 2 * self.length * self.k[0].numel() * self.k.element_size()

    def clone(self) -> "KVCache":
        """A copy holding just the used positions (the doubling headroom is not copied)."""
        new = copy.copy(self)
        new.k, new.v = self.k[: max(self.length, 1)].clone(), self.v[: max(self.length, 1)].clone()
        new.graph_position = None
        return new


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

    def clone(self) -> "LinearState":
        new = copy.copy(self)
        new.conv, new.recurrent = self.conv.clone(), self.recurrent.clone()
        return new


class SequenceState:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device):
        self.position = 0
        self.layers = [
            LinearState(cfg, dtype, device) if t == "linear_attention" else KVCache(cfg.num_key_value_heads, cfg.head_dim, dtype, device)
            for t in cfg.layer_types
        ]

    def clone(self) -> "SequenceState":
        new = copy.copy(self)
        new.layers = [layer.clone() for layer in self.layers]
        return new

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
