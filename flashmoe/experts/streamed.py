"""The CPU path's routed experts: records fetched through the expert store (RAM cache, disk) and
computed by PyTorch, or for a few decode tokens by the numba kernel straight from the cached records."""

from __future__ import annotations

import itertools
from contextlib import closing

import torch

from ..layers.mlp import SILU, Swiglu, swiglu_expert
from .store import ExpertStore


# Up to this many tokens the kernel computes them (a matvec per token, each expert read once for all
# of its tokens); more are multiplied by PyTorch from each expert dequantized once. On the demo model
# 16 tokens ran 2.2x faster through the kernel than through PyTorch (entry 71).
KERNEL_MAX_TOKENS = 32


class StreamedExperts:
    """The routed experts of one layer. Each needed expert is read once per call (once per layer per
    prefill chunk, not once per token). Decode tokens (up to KERNEL_MAX_TOKENS: a sequence's or a
    batch's) go through `kernel` (CpuExperts: numba, straight from the records in the host cache)
    when one is given; otherwise, and for prefill, each record is dequantized and multiplied by
    PyTorch, overlapping the reads of later ones."""

    def __init__(self, store: ExpertStore, layer: int, timer, kernel=None, act: Swiglu = SILU):
        self.store, self.layer, self.timer, self.kernel, self.act = store, layer, timer, kernel, act

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) the routed experts of x [T, H]: ids and weights [T, k]."""
        y = self._decode(x, ids, weights) if self.kernel is not None and x.shape[0] <= KERNEL_MAX_TOKENS else self._computed(x, ids, weights)
        return y if residual is None else residual + y

    def _computed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each needed record dequantized by PyTorch and multiplied with its tokens: the records of
        one store batch dequantized together (a few operators per batch, not per expert: entry 87),
        each expert's tokens found by one sort of the routing."""
        needed = torch.unique(ids).tolist()  # ascending
        k = ids.shape[1]
        order = torch.argsort(ids.flatten(), stable=True)  # (token, slot) pairs grouped by expert, ascending
        ends = torch.bincount(ids.flatten(), minlength=needed[-1] + 1).cumsum(0).tolist()
        layout = self.store.layout
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cap = self.store.batch
        for start in range(0, len(needed), cap):
            with closing(self.store.load(self.layer, needed[start : start + cap])) as records:
                with self.timer.section("expert_io"):
                    batch = list(records)
                with self.timer.section("expert_compute"):
                    stacked = torch.stack([record for _, record in batch])
                    gate_ups, downs = layout.weights(stacked, x.dtype)
                    biases = layout.biases(stacked, x.dtype)
                    for j, (expert, _) in enumerate(batch):
                        pairs = order[(ends[expert - 1] if expert else 0) : ends[expert]]
                        tokens, slot = pairs // k, pairs % k
                        y = swiglu_expert(x[tokens], gate_ups[j], downs[j], self.act,
                                          None if biases is None else (biases[0][j], biases[1][j]))
                        # weights may be fp32 (a router in fp32, GLM's): the product is cast back, as transformers does
                        results[expert] = tokens, (y * weights[tokens, slot, None]).to(x.dtype)
        # Sum in ascending expert order, whatever order the reads completed in: the result is then
        # deterministic (and in the reference's order), which matters at 16-bit precision.
        with self.timer.section("expert_compute"):
            out = torch.zeros_like(x)
            for expert in needed:
                out.index_add_(0, *results[expert])
        return out

    def _decode(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A few tokens (decode, one sequence's or a batch's): the kernel reads each expert where it
        lies in the store's pool, while the load keeps it pinned there, once for all the tokens that
        chose it. Each token's experts are summed in routing order (fp32), chunk after chunk."""
        rows = ids.tolist()
        needed = sorted({e for row in rows for e in row})
        if len(needed) <= self.store.batch:  # the usual step: one load, every pair in routing order
            with closing(self.store.load(self.layer, needed)) as records:
                with self.timer.section("expert_io"):
                    slots = {e: self.store.slot_of(record) for e, record in itertools.islice(records, len(needed))}
                with self.timer.section("expert_compute"):
                    tokens = [t for t, row in enumerate(rows) for _ in row]
                    return self.kernel(self.store.pool, [slots[e] for row in rows for e in row], weights, x,
                                       tokens).to(x.dtype)
        out = torch.zeros(x.shape, dtype=torch.float32)
        for start in range(0, len(needed), self.store.batch):
            chunk = needed[start : start + self.store.batch]
            with closing(self.store.load(self.layer, chunk)) as records:
                with self.timer.section("expert_io"):
                    slots = {e: self.store.slot_of(record) for e, record in itertools.islice(records, len(chunk))}
                with self.timer.section("expert_compute"):
                    pairs = [(t, j) for t, row in enumerate(rows) for j, e in enumerate(row) if e in slots]
                    tokens, cols = zip(*pairs)
                    out += self.kernel(self.store.pool, [slots[rows[t][j]] for t, j in pairs], weights[tokens, cols], x, tokens)
        return out.to(x.dtype)
