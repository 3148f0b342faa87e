"""Per-layer embeddings (PLE, Qwen4-Exp): hashed n-gram embeddings added to the hyper-connection
streams (layers/hyper.py) before some linear-attention layers.

Each token's n-grams of orders 2..`order` (the token and the ones before it) are hashed into
`heads_per_order` tables per order: the hash multiplies each token of the n-gram by its own odd
multiplier (derived from the seed and the layer by SplitMix64), XORs the products, and takes the
result modulo the head's table size (a prime: distinct for every head of every PLE layer). The rows
of all heads, concatenated, are the token's n-gram embedding. An EOS ends a document: tokens before
the latest EOS read as EOS, and so do the positions before the sequence's start, so a token's
n-grams depend on its last order-1 tokens only (the state a decode step carries).

The tables are too large for memory at the released size (51B values): their rows are read from
disk as each step starts (runtime/ngram_rows.py) and collected here.

The embedding then feeds the streams: a key per stream and one shared value are projected from it;
each stream's gate is the scaled dot product of its key with the RMS-normed stream (square-rooted
with its sign kept), the gated values are added to the streams, and so is a causal depthwise
convolution (dilated by `order`, then SiLU) over their normed form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from .deltanet import causal_conv
from .norm import RMSNorm
from .state import NgramState

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
_LAYER_STRIDE = 10007  # each PLE layer's seed: seed + stride * its index among the PLE layers


@dataclass(frozen=True, slots=True)
class NgramSpec:
    order: int  # the largest n-gram (ngram_size); orders 2..order are embedded
    heads_per_order: int
    dim: int  # of the concatenated rows of all heads (ple_embed_dim)
    conv_kernel: int
    vocab_size: int  # of the tokens (bounds the hash multipliers)
    table_base: int  # head tables are the primes from here on (ngram_vocab_size_base)
    table_multiple: int  # the concatenated tables padded to a multiple of this
    seed: int
    index: int  # this layer's place among the PLE layers
    eos: int
    shards: int  # the checkpoint stores each layer's table in this many row blocks (split_ngram_parts)

    @property
    def heads(self) -> int:
        return (self.order - 1) * self.heads_per_order

    @property
    def width(self) -> int:
        """Values of one table row: each head's share of the concatenated embedding."""
        return self.dim // self.heads


def _splitmix64(value: int) -> int:
    value = (value + _GOLDEN_GAMMA) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def hash_multipliers(spec: NgramSpec) -> list[int]:
    """One odd multiplier per n-gram position; below 2^63 / vocab_size, so no token's product
    overflows int64."""
    half = max(1, (((1 << 63) - 1) // max(spec.vocab_size, 1)) // 2)
    base = spec.seed + _LAYER_STRIDE * spec.index
    return [2 * (_splitmix64((base + _GOLDEN_GAMMA * (i + 1)) & _MASK64) % half) + 1 for i in range(spec.order)]


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def head_table_sizes(spec: NgramSpec) -> list[int]:
    """This layer's heads' table sizes: the primes >= table_base, the earlier PLE layers' heads
    taking the first ones."""
    skip, sizes, n = spec.index * spec.heads, [], spec.table_base - 1
    while len(sizes) < spec.heads:
        n += 1
        if _is_prime(n):
            if skip:
                skip -= 1
            else:
                sizes.append(n)
    return sizes


def ngram_rows(history: torch.Tensor, spec: NgramSpec, multipliers: list[int], sizes: list[int]) -> torch.Tensor:
    """history [order - 1 + T] token ids (the last order-1 before the T new ones) -> each new
    token's table row per head [T, heads], in the concatenated table (head h's rows after those
    of heads 0..h-1)."""
    context, device = spec.order - 1, history.device
    positions = torch.arange(context, history.shape[0], device=device)
    eos_so_far = torch.cumsum(history == spec.eos, 0)
    back = []  # back[s]: the token s places before each position, EOS across a document boundary
    for s in range(spec.order):
        token = history[positions - s]
        crossed = eos_so_far[positions - 1] - eos_so_far[positions - s] > 0 if s >= 2 else None
        back.append(token if crossed is None else torch.where(crossed, spec.eos, token))
    size = torch.tensor(sizes, device=device)
    offset = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
    rows, mixed = [], back[0] * multipliers[0]
    for n in range(2, spec.order + 1):
        mixed = mixed ^ (back[n - 1] * multipliers[n - 1])
        heads = slice((n - 2) * spec.heads_per_order, (n - 1) * spec.heads_per_order)
        rows.append(mixed[:, None] % size[heads] + offset[heads])
    return torch.cat(rows, dim=-1)


def table_rows(spec: NgramSpec) -> int:
    """Rows of the layer's concatenated table: its heads' tables, padded to spec.table_multiple."""
    return -(-sum(head_table_sizes(spec)) // spec.table_multiple) * spec.table_multiple


def shard_rows(spec: NgramSpec) -> list[int]:
    """The rows of each block the checkpoint stores the table in (`...ngram_embedding.shard_<i>`):
    torch.chunk's split into spec.shards, equal blocks with the last one shorter (or fewer blocks)."""
    total = table_rows(spec)
    block = -(-total // spec.shards)
    return [min(block, total - start) for start in range(0, total, block)]


NGRAM_SHARD = re.compile(r"model\.layers\.(\d+)\.ple\.ple_embedding\.ngram_embedding\.shard_(\d+)\.weight")


class PendingRows(Protocol):
    """Table rows being read: `result()` waits for them -> [*rows.shape, row width]."""

    def result(self) -> torch.Tensor: ...


class NgramEmbedding(nn.Module):
    """Hash each new token's n-grams and read their rows: [T, dim]. The table is no module weight:
    at its real size (51B values) it stays on disk, and `fetch_rows` (attached once the model is
    loaded: Model.attach_ngram_tables) starts reading rows that `result()` later collects."""

    def __init__(self, spec: NgramSpec):
        super().__init__()
        self.spec = spec
        # Plain ints, not buffers: the model is built on the meta device and only loaded weights materialise.
        self.multipliers, self.sizes = hash_multipliers(spec), head_table_sizes(spec)
        self.fetch_rows: Callable[[torch.Tensor], PendingRows] | None = None

    def start(self, ids: torch.Tensor, states: list[NgramState], slices: list[slice]) -> PendingRows:
        """Start reading the rows of the new ids [T], on the host (sequence i's at slices[i], its
        history in states[i], advanced in place)."""
        if self.fetch_rows is None:
            raise RuntimeError("the n-gram tables are not attached: load the model with flashmoe.Engine")
        rows = []
        for s, state in zip(slices, states):
            history = torch.cat([state.ids, ids[s]])
            state.ids.copy_(history[-state.ids.shape[0] :])
            rows.append(ngram_rows(history, self.spec, self.multipliers, self.sizes))
        return self.fetch_rows(torch.cat(rows))


class PerLayerEmbedding(nn.Module):
    def __init__(self, hidden: int, streams: int, spec: NgramSpec, eps: float, zero_centred_norms: bool):
        super().__init__()
        self.hidden, self.streams, self.spec = hidden, streams, spec
        width = streams * hidden
        self.ple_embedding = NgramEmbedding(spec)
        self.key_proj = nn.Linear(spec.dim, width, bias=False)
        self.value_proj = nn.Linear(spec.dim, hidden, bias=False)
        self.norm_key, self.norm_query, self.norm_conv = (RMSNorm(width, eps, zero_centred_norms, group=hidden) for _ in range(3))
        self.conv1d = nn.Conv1d(width, width, spec.conv_kernel, groups=width, dilation=spec.order, bias=False)

    def start(self, ids: torch.Tensor, states: list[NgramState], slices: list[slice]) -> PendingRows:
        """Start reading the n-gram rows of ids [T], the tokens of one or more sequences (sequence
        i's at slices[i], its history in states[i]): as soon as the step's ids are known, so the
        reads overlap the layers before this one."""
        return self.ple_embedding.start(ids, states, slices)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, states: list[NgramState], slices: list[slice]) -> torch.Tensor:
        """x [T, streams * H], the residual streams; rows [T, heads, row width]: the table rows that
        `start` read for the step's tokens -> what to add to the streams."""
        embedded = rows.flatten(-2).to(x.dtype)  # the compute dtype (the projections may store another)
        key = self.norm_key(self.key_proj(embedded)).unflatten(-1, (self.streams, self.hidden))
        query = self.norm_query(x).unflatten(-1, (self.streams, self.hidden))
        gate = (key * query).sum(-1, keepdim=True) / math.sqrt(self.hidden)
        gate = gate.sign() * gate.abs().clamp_min(1e-6).sqrt()
        gated = (torch.sigmoid(gate) * self.value_proj(embedded).unsqueeze(-2)).flatten(-2)
        normed = self.norm_conv(gated)
        conv = torch.cat([causal_conv(normed[s], state, self.conv1d.weight, self.spec.order) for s, state in zip(slices, states)])
        return gated + conv

    def new_state(self, dtype: torch.dtype, device) -> NgramState:
        window = (self.spec.conv_kernel - 1) * self.spec.order
        return NgramState(self.spec.order - 1, self.spec.eos, window, self.streams * self.hidden, dtype, device)
