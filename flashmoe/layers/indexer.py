"""QSA's token indexer (Qwen4-Exp's "indexed_attention"): which earlier positions each query's
attention may see.

The positions are cut into blocks of `block` from the sequence's start. A block, once complete, is
compressed into one index key: the mean of its positions' raw index keys, RMS-normed, rotated at
the block's first position. Each query scores the complete blocks it sees by the sum over its index
heads of relu(q_h . key) / sqrt(head_dim), and attends to the positions of the best `budget /
block` of them plus those after its last complete block (itself included), at most budget + block
- 1 in all; a query seeing no more blocks than that sees everything before it. The blocks are
compressed as they complete and kept in the sequence's cache (layers/state.py IndexedKVCache), so
a decode step scores the blocks without recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary
from .state import IndexedKVCache


@dataclass(frozen=True, slots=True)
class IndexerSpec:
    heads: int
    head_dim: int
    budget: int  # positions a query sees in the blocks it selects
    block: int  # positions per compressed key

    @property
    def top_blocks(self) -> int:
        return self.budget // self.block


class TokenIndexer(nn.Module):
    def __init__(self, hidden: int, spec: IndexerSpec, eps: float, zero_centred_norms: bool, rotary: RotaryEmbedding):
        super().__init__()
        self.spec, self.rotary = spec, rotary
        self.index_qk_proj = nn.Linear(hidden, (spec.heads + 1) * spec.head_dim, bias=False)  # the query heads, one key
        self.q_layernorm = RMSNorm(spec.head_dim, eps, zero_centred_norms)
        self.k_layernorm = RMSNorm(spec.head_dim, eps, zero_centred_norms)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (index queries [T, heads, head_dim], normed and rotated; raw index keys [T, head_dim])."""
        s = self.spec
        q, k = self.index_qk_proj(x).split([s.heads * s.head_dim, s.head_dim], dim=-1)
        return apply_rotary(self.q_layernorm(q.unflatten(-1, (s.heads, s.head_dim))), cos, sin), k

    def select(self, q: torch.Tensor, keys: torch.Tensor, cache: IndexedKVCache, start: int) -> torch.Tensor:
        """One sequence's n queries at positions start.. and their raw index keys; the cache's
        blocks extended by those they complete -> which positions each query sees [n, start + n]."""
        self._compress(keys, cache, start)
        n, B, top = q.shape[0], self.spec.block, self.spec.top_blocks
        blocks, device = cache.blocks, q.device
        positions = start + torch.arange(n, device=device)
        seen = (positions + 1) // B  # the complete blocks each query sees
        chosen = seen[:, None] > torch.arange(blocks.shape[0] + 1, device=device)  # all of them, until scored
        if int(seen[-1]) > top:
            scores = torch.relu(q.float() @ blocks.float().t()).sum(1) / self.spec.head_dim**0.5  # [n, blocks]
            # Queries seeing the same blocks are ranked together, over exactly those blocks: topk's
            # order among equal scores (relu's zeros) depends on the length it ranks.
            for count in seen[seen > top].unique().tolist():
                rows = seen == count
                best = scores[rows, :count].topk(top, dim=-1).indices
                chosen[rows] = torch.zeros_like(chosen[rows]).scatter_(1, best, True)
        key_positions = torch.arange(start + n, device=device)
        in_chosen = chosen[:, key_positions // B]
        after_blocks = key_positions[None, :] >= (seen * B)[:, None]
        return (key_positions[None, :] <= positions[:, None]) & (in_chosen | after_blocks)

    def _compress(self, keys: torch.Tensor, cache: IndexedKVCache, start: int) -> None:
        """Append the new raw keys to the block still filling; compress each block they complete."""
        B = self.spec.block
        pending = torch.cat([cache.pending, keys])
        complete = pending.shape[0] // B
        if complete:
            first = start - cache.pending.shape[0]  # the position of pending's first key: a block's start
            pooled = pending[: complete * B].unflatten(0, (complete, B)).float().mean(1).to(keys.dtype)
            cos, sin = self.rotary(first + B * torch.arange(complete, device=keys.device))
            cache.blocks = torch.cat([cache.blocks, apply_rotary(self.k_layernorm(pooled)[:, None], cos, sin)[:, 0]])
        cache.pending = pending[complete * B :]
