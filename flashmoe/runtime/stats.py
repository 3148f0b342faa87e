"""Wall-clock accounting by section (mixer, routing, expert I/O, ...), for the live summary, and the
GPU expert tier's counters (here rather than beside the tier: the engine reads them without
importing the Triton kernels)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass


class Counters:
    """A slotted dataclass of integer counters that add and subtract field by field. Read by slot,
    not with dataclasses.astuple (which deep-copies every field: most of a decode step's Python
    cost once, as the generation loop takes differences of these on every token)."""

    __slots__ = ()

    def _values(self) -> list[int]:
        return [getattr(self, name) for name in self.__slots__]

    def __add__(self, other):
        return type(self)(*(a + b for a, b in zip(self._values(), other._values())))

    def __sub__(self, other):
        return type(self)(*(a - b for a, b in zip(self._values(), other._values())))


@dataclass(slots=True)
class GpuTierStats(Counters):
    hits: int = 0  # lookups served from a GPU slot, prefetched ones included
    misses: int = 0  # lookups copied in when the layer's routing was known
    admitted: int = 0
    bytes_copied: int = 0  # host -> GPU, prefetches included
    predicted: int = 0  # lookups of layers whose experts were predicted one layer ahead
    predicted_right: int = 0  # ... that the prediction named
    prefetched: int = 0  # experts copied ahead on a prediction
    prefetch_hits: int = 0  # ... that the real routing then used
    cpu_computed: int = 0  # host-resident misses computed on the CPU instead of copied (HostCompute)
    host_reads: int = 0  # lookups the kernels read in place from pinned host memory (resident decode)
    swapped: int = 0  # experts moved to the GPU by adaptive placement, each for one moved to the host

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.host_reads
        return self.hits / total if total else 0.0

    @property
    def prediction_accuracy(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else 0.0


class _Section:
    __slots__ = ("timer", "name", "t0")

    def __init__(self, timer: "Timer", name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.timer.sync is not None:
            self.timer.sync()
        self.timer.seconds[self.name] += time.perf_counter() - self.t0
        return False


class Timer:
    """Sums wall time per named section. On CPU the wall clock is the truth; asynchronous devices
    need a synchronize at each boundary for the split to mean anything, which `sync` provides."""

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    def section(self, name: str) -> _Section:
        if self.sync is not None:
            self.sync()
        return _Section(self, name)
