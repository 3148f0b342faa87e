"""What one forward pass needs beside its token ids, in one object the layers read: the sequence
states it continues (one, or a batch whose tokens lie one sequence after another), where each
layer's routed experts come from, the timer, the next-layer guesses (prefetch), the n-gram rows
being read for the per-layer embeddings, and inside a CUDA graph the device tensor of the position
being written.

The model's code is the same eagerly and under capture: `runtime/graphs.py` records a decode step
by running the model with a context whose `section` and `run_experts` mark where the recorded
step must hand control back to the host (the routed experts that read the routing there).
"""

from __future__ import annotations

import itertools
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from ..layers.ple import PendingRows
    from ..layers.state import SequenceState
    from ..moe.block import RoutedExperts

# Residual [T, H] after layer i's dense part -> the next MoE layer's guessed expert ids [T, k], or None.
NextLayerGuess = Callable[[torch.Tensor], "torch.Tensor | None"]
# (residual x [T, H], the mixer's output [T, H]) -> the layer's output [T, H] through its whole MoE
# half in one call (experts/cpu_moe_step.py), or None where the eager path must run.
MoEStep = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class _NullSection:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class NullTimer:
    """A timer whose sections time nothing (the model's own tests, and captured graphs)."""

    seconds: dict[str, float] = {}
    sync = None

    def section(self, name: str) -> AbstractContextManager:
        return _NullSection()


@dataclass(slots=True)
class StepContext:
    states: Sequence[SequenceState]  # the sequences the step continues, in the order of their tokens
    lengths: Sequence[int] = ()  # each one's tokens in this step; () with one sequence: all of them
    experts: Sequence[RoutedExperts | None] = ()  # per layer, from the runtime; None for dense layers
    moe_steps: Sequence[MoEStep | None] = ()  # per layer, from the runtime where it has one (the CPU path)
    timer: object = field(default_factory=NullTimer)  # runtime.stats.Timer, or anything with section(name)
    guesses: dict[int, NextLayerGuess] = field(default_factory=dict)  # prefetch: layer i -> next MoE layer's guess
    graph_position: torch.Tensor | None = None  # [sequences] int64 on the device, while a graph is recorded
    # [sequences] int64 on the device, 1 where a sequence runs, 0 for a pooled graph's idle slot
    # (runtime/graphs.py: its DeltaNet state must not move)
    active: torch.Tensor | None = None
    # While a graph is recorded: for each attention layer, keyed by the id of the first sequence's
    # KVCache, every sequence's cache buffers as offsets from that one's (kernels.attention_decode's
    # kv_offsets), so the layer attends for the whole batch in one launch
    kv_offsets: dict[int, torch.Tensor] = field(default_factory=dict)
    last_only: bool = True  # logits of the last position only
    # PLE layer i -> the reads of its n-gram rows, started from the host's ids before the layers run
    # (Model.start_ngram_reads)
    ngram_rows: dict[int, PendingRows] = field(default_factory=dict)

    def positions(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The positions of this step's tokens [T], each in its own sequence: read on the device
        inside a graph."""
        if self.graph_position is not None:
            return self.graph_position
        lengths = self.lengths or [tokens]
        return torch.cat([torch.arange(s.position, s.position + n, device=device) for s, n in zip(self.states, lengths)])

    def slices(self, tokens: int) -> list[slice]:
        """Where each sequence's tokens lie among the step's T."""
        ends = list(itertools.accumulate(self.lengths or [tokens]))
        return [slice(end - n, end) for end, n in zip(ends, self.lengths or [tokens])]

    def last_positions(self, tokens: int) -> slice | list[int]:
        """Each sequence's last token among the step's T (its logits are the step's answer): a
        slice where it can be (a list would be copied to the device, which a graph's capture refuses)."""
        if len(self.states) == 1:
            return slice(tokens - 1, tokens)
        if tokens == len(self.states):  # a token per sequence: all of them
            return slice(0, tokens)
        return [s.stop - 1 for s in self.slices(tokens)]

    def section(self, name: str) -> AbstractContextManager:
        """Time the enclosed work as `name` (a no-op inside a recorded graph)."""
        return self.timer.section(name)

    def moe_step(self, layer: int, x: torch.Tensor, mixer_out: torch.Tensor) -> torch.Tensor | None:
        """x + mixer_out through the layer's whole MoE half in one call, where the runtime gives one
        and it covers this step; else None."""
        step = self.moe_steps[layer] if self.moe_steps else None
        if step is None:
            return None
        with self.section("moe_step"):
            return step(x, mixer_out)

    def guess_next(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        guess = self.guesses.get(layer)
        return guess(x) if guess is not None else None

    def run_experts(self, layer: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    residual: torch.Tensor) -> torch.Tensor:
        """residual + layer's routed experts of h (ids [T, k], or [T, 2k] with the next layer's guess)."""
        return self.experts[layer](h, ids, weights, residual=residual)
