"""Decode steps replayed from CUDA graphs.

A decode step launches a few hundred small kernels; from Python each launch costs ~10 us, which
for 60 layers would be most of a token's budget. So everything up to the routing decision of each
layer (norms, mixer, router, shared expert) is captured once into a graph and replayed; the
routed experts stay outside, because the host must see the routing to fetch them.
With resident experts (Engine.preload) the host never needs the routing, so the routed experts are
captured too and the whole step is one graph: one launch per token. (When the timer synchronizes
for a profile, each layer's dense part and routed experts are graphs of their own, timed apart.)
Graphs bind addresses: the KV caches are reserved to the generation's length up front and write at
a device-side position, and the DeltaNet states update in place. What one piece hands the next
(a layer's dense outputs to its routed experts, cos and sin, the logits) is the tensor it returned
while captured, kept referenced: its memory in the graphs' shared pool stays its own, so every
replay writes it at the same address and no copy into a static buffer is needed. Only the residual
stream `x` is a buffer of its own, which the routed experts (captured or not) write in place.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from typing import Callable, NamedTuple

import torch

from ..models.qwen3_5_moe import NullTimer
from .state import KVCache, LinearState, SequenceState


@contextmanager
def _no_collection_while_capturing():
    """Python's cycle collector off while graphs are captured. An earlier generation's decoder (and
    its graphs) can sit in a reference cycle; collected in the middle of a capture, its graph's
    reset is an operation a capturing stream refuses, and the capture fails (seen in a bench run
    that re-captured for each row). torch.cuda.graph no longer collects before it begins."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Body(NamedTuple):
    """One piece of the step: its timer section, the function, and whether it is replayed from a
    graph (the host-driven routed experts are not: they read the routing)."""

    section: str | None
    run: Callable[[], None]
    captured: bool


class GraphedDecoder:
    def __init__(self, engine, state: SequenceState, capacity: int):
        self.engine, self.state, self.capacity = engine, state, capacity
        dev = engine.device
        self.caches = [c for c in state.layers if isinstance(c, KVCache)]
        for c in self.caches:
            c.reserve(capacity)
        H = engine.config.hidden_size
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)
        self.x = torch.zeros(1, H, dtype=engine.dtype, device=dev)  # the residual stream between layers
        # layer i's dense outputs (x_mid, h, weights, ids) for its routed experts, as captured
        self.routing: dict[int, tuple[torch.Tensor, ...]] = {}
        self.cos = self.sin = self.logits = None
        self.pool = torch.cuda.graph_pool_handle()
        self.bodies = self._bodies(resident=engine.resident)
        self.whole: torch.cuda.CUDAGraph | None = None  # the whole step: every body captured, no profile
        self.graphs: list[torch.cuda.CUDAGraph] = []  # else one per captured body, in order
        self._capture()

    def _prologue(self) -> None:
        self.cos, self.sin = self.engine.model.rotary(self.position)
        self.x.copy_(self.engine.model.model.embed_tokens(self.token))

    def _layer(self, i: int) -> None:
        layer = self.engine.model.layers[i]
        x, h, weights, ids = layer.dense(self.x, self.cos, self.sin, self.state.layers[i], NullTimer())
        if ids is None:
            self.x.copy_(x)
        else:
            self.routing[i] = x, h, weights, ids  # ids: own, then (prefetch) the next layer's guess

    def _experts(self, i: int) -> None:
        """Layer i's routed experts from what its dense part returned: x = x_mid + experts(h)."""
        x_mid, h, weights, ids = self.routing[i]
        self.engine.model.layers[i].mlp.experts.decode_into(h, ids, weights, residual=x_mid, out=self.x)

    def _epilogue(self) -> None:
        self.logits = self.engine.model.logits(self.x)

    def _bodies(self, resident: bool) -> list[Body]:
        bodies = [Body(None, self._prologue, True)]
        for i, layer in enumerate(self.engine.model.layers):
            bodies.append(Body("dense (graph)", lambda i=i: self._layer(i), True))  # mixer, router, shared expert
            if getattr(layer.mlp, "experts", None) is not None:
                # host-driven experts time their own sections (expert_io, expert_compute)
                bodies.append(Body("experts (graph)" if resident else None, lambda i=i: self._experts(i), resident))
        bodies.append(Body("head", self._epilogue, True))
        return bodies

    def _capture(self) -> None:
        captured = [b.run for b in self.bodies if b.captured]
        for c in self.caches:
            c.graph_position = self.position
        self.position.fill_(self.state.position)
        # Warm up once eagerly on a side stream (kernel selection, Triton compiles, workspaces), then
        # restore the states it advanced: the KV write lands where the real step writes the same
        # values later. Host-driven experts are left out (they would copy and count).
        saved = [(s.conv.clone(), s.recurrent.clone()) for s in self.state.layers if isinstance(s, LinearState)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for run in captured:
                run()
        torch.cuda.current_stream().wait_stream(side)
        linear = [s for s in self.state.layers if isinstance(s, LinearState)]
        for s, (conv, rec) in zip(linear, saved):
            s.conv.copy_(conv)
            s.recurrent.copy_(rec)
        if self.engine.gpu_tier is not None:
            self.engine.gpu_tier.forget_uncollected()  # the warm-up's expert lookups are no token's
        with torch.inference_mode(), _no_collection_while_capturing():
            if all(b.captured for b in self.bodies) and self.engine.timer.sync is None:
                self.whole = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.whole, pool=self.pool):
                    for run in captured:
                        run()
                return
            for run in captured:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    run()
                self.graphs.append(g)

    def step(self, token: int) -> torch.Tensor:
        """Feed one token; return logits [1, vocab] (a static buffer, overwritten by the next step)."""
        if self.state.position >= self.capacity:
            raise ValueError("the decode graphs were captured for a shorter sequence")
        timer = self.engine.timer
        self.token.fill_(token)
        self.position.fill_(self.state.position)
        if self.whole is not None:
            with timer.section("step (graph)"):
                self.whole.replay()
        else:
            graphs = iter(self.graphs)
            for body in self.bodies:
                if not body.captured:
                    body.run()
                    continue
                with timer.section(body.section) if body.section else nullcontext():
                    next(graphs).replay()
        self.state.position += 1
        for c in self.caches:
            c.length += 1
        return self.logits

    def release(self) -> None:
        """Hand the state back to eager use."""
        for c in self.caches:
            c.graph_position = None
