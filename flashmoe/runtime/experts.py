"""Routed experts computed from records fetched through the expert store (the CPU reference path)."""

from __future__ import annotations

from contextlib import closing

import torch

from ..layers.moe import swiglu_expert
from .expert_store import ExpertStore


class StreamedExperts:
    """The routed experts of one layer. Each needed expert is read once per call (once per layer per
    prefill chunk, not once per token); compute on early records overlaps the reads of later ones."""

    def __init__(self, store: ExpertStore, layer: int, timer):
        self.store, self.layer, self.timer = store, layer, timer

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        needed = torch.unique(ids).tolist()  # ascending
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cap = self.store.batch
        for start in range(0, len(needed), cap):
            with closing(self.store.load(self.layer, needed[start : start + cap])) as records:
                while True:
                    with self.timer.section("expert_io"):
                        item = next(records, None)
                    if item is None:
                        break
                    expert, record = item
                    with self.timer.section("expert_compute"):
                        tokens, slot = (ids == expert).nonzero(as_tuple=True)
                        gate_up, down = self.store.layout.weights(record, x.dtype)
                        results[expert] = tokens, swiglu_expert(x[tokens], gate_up, down) * weights[tokens, slot, None]
        # Sum in ascending expert order, whatever order the reads completed in: the result is then
        # deterministic (and in the reference's order), which matters at 16-bit precision.
        with self.timer.section("expert_compute"):
            out = torch.zeros_like(x)
            for expert in needed:
                out.index_add_(0, *results[expert])
        return out
