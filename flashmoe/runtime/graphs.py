"""Decode steps replayed from CUDA graphs, recorded from the model's own forward.

A decode step launches a few hundred small kernels; from Python each launch costs ~10 us, which
for 60 layers would be most of a token's budget. So the step is recorded once and replayed. The
recording runs `Model.forward` itself, with a step context (models/context.py) that captures the
kernels into graphs and marks where the host must take over: routed experts that read the routing
on the host (copying misses into GPU slots) end one graph, are kept as an eager call, and the next
graph begins after them. With resident experts (Engine.preload) the host never needs the routing,
so the whole step is one graph: one launch per token. With a profiling timer, each layer's dense
part and routed experts are graphs of their own, timed apart.

Graphs bind addresses: the KV caches are reserved to the generation's length up front and written
at a device-side position (the context's graph_position), and the DeltaNet states update in place.
What one graph hands the next is the tensor it returned while captured, kept referenced: its memory
in the graphs' shared pool stays its own, so every replay writes it at the same address. Where an
eager call sits between two graphs, it writes its result into a buffer of its own.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Callable

import torch

from ..layers.state import KVCache, LinearState, SequenceState
from ..models.context import NullTimer, StepContext


@contextmanager
def _no_collection_while_capturing():
    """Python's cycle collector off while graphs are captured. An earlier generation's graphs can
    sit in a reference cycle; collected in the middle of a capture, a graph's reset is an operation
    a capturing stream refuses, and the capture fails (seen in a bench run that re-captured for
    each row)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _capturable(experts) -> bool:
    return getattr(experts, "capturable", False)


class _WarmUp(StepContext):
    """One eager run of the step before it is captured (kernel selection, Triton compiles,
    workspaces), writing where the graph will: host-driven experts are left out (they would copy
    and count), their layer's residual passes through."""

    def run_experts(self, layer, h, ids, weights, residual):
        if _capturable(self.experts[layer]):
            return super().run_experts(layer, h, ids, weights, residual)
        return residual


class _Recorder(StepContext):
    """Runs the forward under capture, cutting it into graphs where the host must take over."""

    def __init__(self, *args, pool, split_layers: bool, **kwargs):
        super().__init__(*args, timer=NullTimer(), **kwargs)
        self.pool, self.split_layers = pool, split_layers
        self.segments: list[tuple[str, torch.cuda.CUDAGraph | Callable[[], None]]] = []
        self._open: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self._open = torch.cuda.CUDAGraph()
        self._open.capture_begin(pool=self.pool)

    def end(self, name: str) -> None:
        self._open.capture_end()
        self.segments.append((name, self._open))
        self._open = None

    def run_experts(self, layer, h, ids, weights, residual):
        experts = self.experts[layer]
        if _capturable(experts) and not self.split_layers:
            return experts(h, ids, weights, residual=residual)
        self.end("dense (graph)")
        if _capturable(experts):  # a profile: the experts in a graph of their own
            self.begin()
            out = experts(h, ids, weights, residual=residual)
            self.end("experts (graph)")
        else:  # the host reads the routing: an eager call between two graphs, into a buffer of its own
            out = torch.empty_like(residual)
            self.segments.append(("", lambda: experts(h, ids, weights, residual=residual, out=out)))
        self.begin()
        return out


class DecodeGraph:
    """The decode step of one sequence, recorded for up to `capacity` positions, replayed per token."""

    def __init__(self, engine, state: SequenceState, capacity: int):
        self.engine, self.state, self.capacity = engine, state, capacity
        self.rebuilds = state.rebuilds  # the state's buffers this graph was captured on
        for cache in state.layers:
            if isinstance(cache, KVCache):
                cache.reserve(capacity)
        device = engine.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.full((1,), state.position, dtype=torch.long, device=device)
        self.segments, self.logits = self._record()

    def _record(self):
        eng, state = self.engine, self.state
        # Warm up on a side stream, then restore the DeltaNet states it advanced: its KV write lands
        # where the real step writes the same values later.
        linear = [s for s in state.layers if isinstance(s, LinearState)]
        saved = [(s.conv.clone(), s.recurrent.clone()) for s in linear]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            eng.model(self.token, _WarmUp([state], experts=eng.experts, guesses=eng.guesses, graph_position=self.position))
        torch.cuda.current_stream().wait_stream(side)
        for s, (conv, rec) in zip(linear, saved):
            s.conv.copy_(conv)
            s.recurrent.copy_(rec)
        eng.settle("warmup")  # the warm-up's expert lookups are no token's
        recorder = _Recorder([state], experts=eng.experts, guesses=eng.guesses, graph_position=self.position,
                             pool=torch.cuda.graph_pool_handle(), split_layers=eng.timer.sync is not None)
        torch.cuda.synchronize()
        with torch.inference_mode(), _no_collection_while_capturing(), torch.cuda.stream(torch.cuda.Stream()):
            recorder.begin()
            logits = eng.model(self.token, recorder)
            recorder.end("head")
        torch.cuda.synchronize()
        segments = recorder.segments
        if len(segments) == 1:
            segments = [("step (graph)", segments[0][1])]
        return segments, logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; return logits [1, vocab] (a static buffer, overwritten by the next step)."""
        if self.state.position >= self.capacity:
            raise ValueError("the decode graphs were captured for a shorter sequence")
        timer = self.engine.timer
        self.token.fill_(token)
        self.position.fill_(self.state.position)
        for name, segment in self.segments:
            if isinstance(segment, torch.cuda.CUDAGraph):
                with timer.section(name):
                    segment.replay()
            else:
                segment()  # host-driven experts time their own sections (expert_io, expert_compute)
        self.state.advance_graphed(token)
        return self.logits
