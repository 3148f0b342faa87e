"""Decode steps with each layer's dense part replayed from a CUDA graph.

A decode step launches a few hundred small kernels; from Python each launch costs ~10 us, which
for 60 layers would be most of a token's budget. So everything up to the routing decision of each
layer (norms, mixer, router, shared expert) is captured once into a graph over static buffers and
replayed; the routed experts stay outside, because the host must see the routing to fetch them.
Graphs bind addresses: the KV caches are reserved to the generation's length up front and write at
a device-side position, and the DeltaNet states update in place.
"""

from __future__ import annotations

import torch

from ..models.qwen3_5_moe import NullTimer
from .state import KVCache, LinearState, SequenceState


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
        self.x = torch.zeros(1, H, dtype=engine.dtype, device=dev)
        self.x_mid = torch.zeros_like(self.x)
        self.h = torch.zeros_like(self.x)
        k = engine.top_k
        self.weights = torch.zeros(1, k, dtype=engine.dtype, device=dev)
        self.ids = torch.zeros(1, 2 * k, dtype=torch.long, device=dev)  # room for the next layer's guess (prefetch)
        self.id_width: dict[int, int] = {}  # columns of `ids` layer i's graph writes
        self.cos = self.sin = None
        self.logits = None
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._capture()

    def _prologue(self) -> None:
        cos, sin = self.engine.model.rotary(self.position)
        if self.cos is None:
            self.cos, self.sin = cos, sin
        else:
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        self.x.copy_(self.engine.model.model.embed_tokens(self.token))

    def _layer(self, i: int) -> None:
        layer = self.engine.model.layers[i]
        x, h, weights, ids = layer.dense(self.x, self.cos, self.sin, self.state.layers[i], NullTimer())
        if ids is None:
            self.x.copy_(x)
        else:
            self.x_mid.copy_(x)
            self.h.copy_(h)
            self.weights.copy_(weights)
            self.ids[:, : ids.shape[1]].copy_(ids)
            self.id_width[i] = ids.shape[1]

    def _epilogue(self) -> None:
        logits = self.engine.model.logits(self.x)
        if self.logits is None:
            self.logits = logits
        else:
            self.logits.copy_(logits)

    def _capture(self) -> None:
        bodies = [self._prologue] + [lambda i=i: self._layer(i) for i in range(len(self.engine.model.layers))]
        bodies.append(self._epilogue)
        for c in self.caches:
            c.graph_position = self.position
        self.position.fill_(self.state.position)
        # Warm up once eagerly on a side stream (kernel selection, workspaces), then restore the
        # states it advanced: the KV write lands where the real step writes the same values later.
        saved = [(s.conv.clone(), s.recurrent.clone()) for s in self.state.layers if isinstance(s, LinearState)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for body in bodies:
                body()
        torch.cuda.current_stream().wait_stream(side)
        linear = [s for s in self.state.layers if isinstance(s, LinearState)]
        for s, (conv, rec) in zip(linear, saved):
            s.conv.copy_(conv)
            s.recurrent.copy_(rec)
        with torch.inference_mode():
            for body in bodies:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    body()
                self.graphs.append(g)

    def step(self, token: int) -> torch.Tensor:
        """Feed one token; return logits [1, vocab] (a static buffer, overwritten by the next step)."""
        if self.state.position >= self.capacity:
            raise ValueError("the decode graphs were captured for a shorter sequence")
        eng = self.engine
        timer = eng.timer
        self.token.fill_(token)
        self.position.fill_(self.state.position)
        self.graphs[0].replay()
        for i, layer in enumerate(eng.model.layers):
            with timer.section("dense (graph)"):  # mixer, router, shared expert
                self.graphs[i + 1].replay()
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None:
                ids = self.ids[:, : self.id_width[i]]  # own ids, then (prefetch) the next layer's guess
                experts.decode_into(self.h, ids, self.weights, residual=self.x_mid, out=self.x)
        with timer.section("head"):
            self.graphs[-1].replay()
        self.state.position += 1
        for c in self.caches:
            c.length += 1
        return self.logits

    def release(self) -> None:
        """Hand the state back to eager use."""
        for c in self.caches:
            c.graph_position = None
