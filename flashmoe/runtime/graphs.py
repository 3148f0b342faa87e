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

from ..layers.state import KVCache, LinearState, SequenceState, StatePool
from ..models.context import NullTimer, StepContext

# A decode graph's sequences at most: its resident experts run the gathered gemv for them all
# (GpuRoutedExperts.graphed), where eagerly the grouped kernels take more than a few tokens, reading
# the routing on the host, which a graph cannot.
GRAPH_MAX_TOKENS = 32


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
        experts = self.experts[layer]
        return experts.graphed(h, ids, weights, residual) if _capturable(experts) else residual


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
            return experts.graphed(h, ids, weights, residual)
        self.end("dense (graph)")
        if _capturable(experts):  # a profile: the experts in a graph of their own
            self.begin()
            out = experts.graphed(h, ids, weights, residual)
            self.end("experts (graph)")
        else:  # the host reads the routing: an eager call between two graphs, into a buffer of its own
            out = torch.empty_like(residual)
            self.segments.append(("", lambda: experts(h, ids, weights, residual=residual, out=out)))
        self.begin()
        return out


def batch_kv_offsets(states: list[SequenceState]) -> dict[int, torch.Tensor]:
    """The step context's kv_offsets (models/context.py) for a batch of states: for each attention
    layer, keyed by the id of the first state's KVCache, every state's cache buffers as offsets
    from that one's, so the layer attends for the whole batch in one launch."""
    from ..kernels.attention_decode import kv_offsets

    return {id(caches[0]): kv_offsets([c.k for c in caches], [c.v for c in caches])
            for caches in zip(*(state.layers for state in states)) if isinstance(caches[0], KVCache)}


class DecodeGraph:
    """The decode step of one or several sequences (one token each, a batch's step), recorded for
    up to `capacity` positions of each, replayed per step. It holds the sequences' buffers: valid
    while none was replaced (a cache grown past the reservation, a preempted state rebuilt).

    Without a capacity: recorded on a StatePool's slots (layers/state.py) as their buffers stand,
    replayed for whichever sequences hold them. A step names the slots that run; an idle one
    computes a throwaway token that writes only its scratch KV position (the last of its buffer:
    StatePool.limit) and leaves its DeltaNet states as they were."""

    def __init__(self, engine, states: list[SequenceState], capacity: int | None = None):
        self.engine, self.states, self.masked = engine, list(states), capacity is None
        if capacity is not None:
            for state in self.states:
                for cache in state.layers:
                    if isinstance(cache, KVCache):
                        cache.reserve(capacity)
        # the positions each state may decode below (its scratch position, masked)
        self.limits = [capacity if capacity is not None else StatePool.limit(s) for s in self.states]
        # what the recording binds: each state's layer list and its KV caches' storage
        self._layers = [(state, state.layers) for state in self.states]
        self._storage = [(c, c.k) for state in self.states for c in state.layers if isinstance(c, KVCache)]
        self._kv_offsets = batch_kv_offsets(self.states)  # valid while the graph is (`valid`)
        # each step's tokens, positions and (masked) which slots run, written on the host and sent
        # in one copy; recorded with every slot idle, so the warm-up run changes no live state
        self._host = torch.zeros(2 + self.masked, len(self.states), dtype=torch.long, pin_memory=True)
        self._host_rows = self._host.numpy()  # written from lists at numpy's cost, not a tensor's each
        self._host_rows[1] = self.limits if self.masked else [s.position for s in self.states]
        self._device = self._host.to(engine.device)
        self._sent = torch.cuda.Event()  # the last step's copy out of the pinned buffer
        self.tokens, self.positions = self._device[0], self._device[1]  # views the recording reads
        # a bucket of one slot runs whenever it is replayed: no mask, so DeltaNet's fused one-token step
        self.active = self._device[2] if self.masked and len(self.states) > 1 else None
        self.segments, self.logits = self._record()

    def valid(self) -> bool:
        """Whether every state still holds the buffers the graphs were recorded on."""
        return all(s.layers is layers for s, layers in self._layers) and all(c.k is k for c, k in self._storage)

    def _context(self, cls, **kwargs) -> StepContext:
        eng = self.engine
        return cls(self.states, [1] * len(self.states), experts=eng.experts, guesses=eng.guesses,
                   graph_position=self.positions, active=self.active, kv_offsets=self._kv_offsets, **kwargs)

    def _record(self):
        eng = self.engine
        # Warm up on a side stream, then restore the DeltaNet states it advanced: its KV writes land
        # where the real step writes the same values later (or, masked, at the scratch position;
        # with every slot idle it advances no DeltaNet state).
        linear = [s for state in self.states for s in state.layers if isinstance(s, LinearState) and self.active is None]
        saved = [(s.conv.clone(), s.recurrent.clone()) for s in linear]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            eng.model(self.tokens, self._context(_WarmUp))
        torch.cuda.current_stream().wait_stream(side)
        for s, (conv, rec) in zip(linear, saved):
            s.conv.copy_(conv)
            s.recurrent.copy_(rec)
        eng.settle("warmup")  # the warm-up's expert lookups are no token's
        recorder = self._context(_Recorder, pool=torch.cuda.graph_pool_handle(), split_layers=eng.timer.sync is not None)
        torch.cuda.synchronize()
        with torch.inference_mode(), _no_collection_while_capturing(), torch.cuda.stream(torch.cuda.Stream()):
            recorder.begin()
            logits = eng.model(self.tokens, recorder)
            recorder.end("head")
        torch.cuda.synchronize()
        segments = recorder.segments
        if len(segments) == 1:
            segments = [("step (graph)", segments[0][1])]
        return segments, logits

    @torch.inference_mode()
    def step(self, tokens: list[int], running: list[SequenceState | None] | None = None) -> torch.Tensor:
        """Feed each sequence its token; return logits [sequences, vocab] (a static buffer,
        overwritten by the next step). Masked: running[i] is the sequence holding slot i, or None
        where it idles (its token ignored)."""
        running = self.states if running is None else running
        if any(s is not None and s.position >= limit for s, limit in zip(running, self.limits)):
            raise ValueError("the decode graphs were captured for a shorter sequence")
        timer = self.engine.timer
        self._sent.synchronize()  # the pinned buffer is free again (at once where the logits were read)
        rows = self._host_rows
        rows[0] = tokens
        rows[1] = [limit if s is None else s.position for s, limit in zip(running, self.limits)]
        if self.masked:
            rows[2] = [s is not None for s in running]
        self._device.copy_(self._host, non_blocking=True)
        self._sent.record()
        for name, segment in self.segments:
            if isinstance(segment, torch.cuda.CUDAGraph):
                with timer.section(name):
                    segment.replay()
            else:
                segment()  # host-driven experts time their own sections (expert_io, expert_compute)
        for state, token in zip(running, tokens):
            if state is not None:
                state.advance_graphed(token)
        return self.logits
