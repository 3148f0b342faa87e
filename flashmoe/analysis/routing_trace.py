"""Routing traces: which experts each token used at each MoE layer, recorded from a real model, and
the two hooks on a layer's routed-experts callable that record and replay them.

Recording is teacher-forced over a text: a position's routing depends only on the tokens up to
it, so feeding the text in prefill chunks yields the ids that decoding the same text token by
token would (up to rounding of near-tied router scores between the batched and the one-token
kernels). What a cache sees is this sequence of consecutive tokens' choices.

File (`.npz`, numpy's zip of arrays, no pickles): `ids` [tokens, moe_layers, k] int16 and `meta`,
a JSON string: {"num_experts", "k", "model" (the model directory's name), "tokens", "source"}.
"""

from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from ..moe.block import RoutedExperts

if TYPE_CHECKING:
    from .locality import StreamGenerator


class TraceError(ValueError):
    pass


@dataclass(frozen=True)
class RoutingTrace:
    ids: np.ndarray  # [T, L, k] int16: T tokens, L MoE layers, k experts per token (distinct)
    num_experts: int
    model: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        ids = self.ids
        if ids.ndim != 3 or ids.dtype != np.int16:
            raise TraceError(f"trace ids must be an int16 array [tokens, layers, k], not {ids.dtype} {list(ids.shape)}")
        T, L, k = ids.shape
        if T < 2 or L < 1 or not 1 <= k <= self.num_experts:
            raise TraceError(f"trace of shape {list(ids.shape)} for {self.num_experts} experts: need >= 2 tokens, k <= experts")
        if ids.min() < 0 or ids.max() >= self.num_experts:
            raise TraceError(f"trace ids must lie in [0, {self.num_experts}); found {ids.min()}..{ids.max()}")
        rows = np.sort(ids, axis=-1)
        if (rows[..., 1:] == rows[..., :-1]).any():
            raise TraceError("a token lists the same expert twice in one layer: not a top-k routing trace")

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def layers(self) -> int:
        return self.ids.shape[1]

    @property
    def k(self) -> int:
        return self.ids.shape[2]

    def save(self, path: str | Path) -> None:
        meta = {"num_experts": self.num_experts, "k": self.k, "model": self.model, "tokens": self.tokens, "source": self.source}
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez_compressed(f, ids=self.ids, meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing trace {path} does not exist (record one with flashmoe trace)")
        try:
            with np.load(path, allow_pickle=False) as f:
                ids, meta = f["ids"], json.loads(str(f["meta"]))
            num_experts, k = int(meta["num_experts"]), int(meta["k"])
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
            raise TraceError(f"{path} is not a flashmoe routing trace ({type(e).__name__}: {e})") from None
        if ids.ndim == 3 and ids.shape[2] != k:
            raise TraceError(f"{path}: its metadata says k={k} but its ids hold {ids.shape[2]} experts per token")
        return cls(ids, num_experts, str(meta.get("model", "")), str(meta.get("source", "")))

    def require(self, num_experts: int, k: int) -> None:
        """Refuse to replay these ids verbatim on a model of another shape (a generated stream,
        analysis/locality.py, carries the statistics to any shape instead)."""
        if (num_experts, k) != (self.num_experts, self.k):
            raise TraceError(
                f"the trace was recorded with {self.num_experts} experts, k={self.k} ({self.model or 'unknown model'}); "
                f"this needs {num_experts} experts, k={k}: replay it through a generated stream instead"
            )


class RecordingExperts:
    """Passes every call through to the layer's experts and keeps the ids the router chose."""

    def __init__(self, inner: RoutedExperts):
        self.inner = inner
        self.ids: list[torch.Tensor] = []  # [T, k] per call, in call order

    @property
    def capturable(self) -> bool:
        return False  # it reads the ids on the host

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **out) -> torch.Tensor:
        self.ids.append(ids.cpu())
        return self.inner(x, ids, weights, **out)


class ReplayExperts:
    """The layer's experts run on ids from a stream instead of the router's; the router's weights
    are kept. Each call takes the stream's next T rows (cyclically), or with `spread` one row from
    each of T streams `spread` rows apart, advancing them all by one: a batch's sequences, each
    with the trace's locality in its own tokens but not in its neighbours'. With `host_sync` the
    router's ids are still read back to the host, as the real path does, so the replay waits where
    a real run waits; without (resident experts, whose real path never reads them) the stream is
    read on the device at a device-side position, so a captured decode graph replays it too."""

    def __init__(self, inner, stream: torch.Tensor, timer, host_sync: bool = True, spread: int = 0):
        self.inner, self.stream, self.timer = inner, stream.to(torch.long), timer  # stream [N, k]
        self.host_sync, self.spread = host_sync, spread
        self.position = 0
        self.device_stream = self.device_position = None

    def _next(self, ids: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        if k != self.stream.shape[1]:
            raise TraceError(f"the replayed stream has {self.stream.shape[1]} experts per token; the router chose {k}")
        step, advance = (self.spread, 1) if self.spread else (1, T)
        if not self.host_sync:
            if self.device_stream is None:
                self.device_stream = self.stream.to(ids.device)
                self.device_position = torch.zeros(1, dtype=torch.long, device=ids.device)
            rows = (self.device_position + torch.arange(T, device=ids.device) * step) % self.stream.shape[0]
            self.device_position += advance
            return self.device_stream[rows]
        with self.timer.section("expert_io"):
            ids.cpu()  # the host sync a real run spends on reading the routing
        rows = (self.position + torch.arange(T) * step) % self.stream.shape[0]
        self.position += advance
        return self.stream[rows]  # host ids: the inner callable's own ids.cpu() is then free

    @property
    def capturable(self) -> bool:
        return getattr(self.inner, "capturable", False) and not self.host_sync

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, **out) -> torch.Tensor:
        return self.inner(x, self._next(ids), weights, **out)

    def graphed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The decode graph's call (runtime/graphs.py) where `capturable`: the stream's rows are
        picked on the device, so each replay of the graph reads the next ones."""
        return self.inner.graphed(x, self._next(ids), weights, residual)


@contextmanager
def wrapped_experts(engine, wrap: Callable[[int, RoutedExperts], RoutedExperts]) -> Iterator[list]:
    """Replace the engine's routed experts of every MoE layer by wrap(moe_index, experts) for the
    block; yields the wrappers in layer order and puts the originals back afterwards. The CPU
    path's one-call MoE steps, which route without the layer's routed experts, are off meanwhile."""
    originals, steps = list(engine.experts), engine.moe_steps
    try:
        engine.moe_steps = []
        for n, i in enumerate(engine.moe_layers):
            engine.experts[i] = wrap(n, originals[i])
        yield [engine.experts[i] for i in engine.moe_layers]
    finally:
        engine.experts[:] = originals
        engine.moe_steps = steps


@contextmanager
def replayed_routing(engine, gen: StreamGenerator, tokens: int, shuffled: bool = False, spread: int = 0) -> Iterator[None]:
    """Every MoE layer of the engine routed by a stream of `tokens` rows of `gen` for the block
    (router weights kept; ReplayExperts). Stream ids are popularity ranks; `shuffled`: each layer's
    ids permuted at random (a placement blind to popularity). `spread`: a call's tokens are
    independent streams that many rows apart (a server's batch; the stream then needs tokens >=
    spread x its largest batch)."""
    moe_layers, E = len(engine.moe_layers), engine.args.moe.num_experts
    ids = gen.generate(tokens, moe_layers).astype("int64")
    if shuffled:
        perm = np.stack([np.random.default_rng(5 + i).permutation(E) for i in range(moe_layers)])
        ids = perm[np.arange(moe_layers)[None, :, None], ids]
    stream = torch.from_numpy(ids)
    sync = not engine.resident  # the host reads the routing only where the real path does
    with wrapped_experts(engine, lambda i, inner: ReplayExperts(inner, stream[:, i], engine.timer, sync, spread)):
        yield


def record(engine, ids: list[int], source: str = "", progress: Callable[[int], None] = lambda done: None) -> RoutingTrace:
    """Teacher-force `ids` through the engine (windows of at most its context length, each from a
    fresh state) and return the routing of every token."""
    window = engine.context_length
    with wrapped_experts(engine, lambda i, inner: RecordingExperts(inner)) as recorders:
        for start in range(0, len(ids), window):
            engine.forward(ids[start : start + window], engine.new_state())
            progress(min(start + window, len(ids)))
    routed = np.stack([torch.cat(r.ids).numpy() for r in recorders], axis=1).astype(np.int16)
    return RoutingTrace(routed, engine.args.moe.num_experts, engine.dir.name, source)
