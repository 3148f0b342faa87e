"""The CPU's share of decode's routed experts (--cpu-experts), beside the GPU's.

Copying (HostCompute): up to `per_layer` of a layer's misses that sit in the host tier are computed
where they lie by the CPU while PCIe copies the others: the host reads RAM at tens of GB/s beside
the link's ~54. The experts' input and routing weights come back with the layer's routing sync; the
CPU's weighted sum is added to the layer's output after the GPU's experts, which do not wait for it.

Resident (ResidentCpuShare): there is no routing sync: the layer's graph asks an ExpertServer
through a mailbox in pinned memory instead (kernels/cpu_expert_server.py and host_handoff.py), and
the GPU reads the others over PCIe meanwhile.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kernels.cpu_expert_server import ExpertServer
from ..kernels.cpu_experts import CpuExperts
from ..kernels.cpu_expert_server import MAX_EXPERTS
from ..kernels.host_handoff import HostHandoff
from ..utils import format_bytes
from ..layers.mlp import SILU, Swiglu
from .store import ExpertStore

if TYPE_CHECKING:
    from .tier import GpuExpertTier


# A CPU expert beats another record over the link only by this margin: a split the measurement's
# noise could reverse is not worth a thread.
SPLIT_MARGIN = 0.95


@dataclass(frozen=True)
class Split:
    """counts[n]: how many of a layer's n host-resident experts the CPU computes, from the measured
    cpu_seconds[c - 1] (one call of c experts) and link_seconds (one more record over the link)."""

    counts: tuple[int, ...]
    cpu_seconds: tuple[float, ...]
    link_seconds: float

    def take(self, n: int, limit: int) -> int:
        return min(self.counts[min(n, len(self.counts) - 1)], limit)

    def describe(self, record_size: int) -> str:
        if not self.cpu_seconds:
            return "CPU share: no expert lies in the host tier, so the CPU takes none"
        return (f"CPU share by measured rates: an expert {self.cpu_seconds[0] * 1e3:.2f} ms on the CPU, a record "
                f"{self.link_seconds * 1e3:.2f} ms over the link ({format_bytes(record_size / self.link_seconds)}/s); "
                f"of n = 0 .. {len(self.counts) - 1} host-resident experts the CPU takes {list(self.counts)}")


def split_counts(cpu_seconds: Sequence[float], link_seconds: float, k: int) -> tuple[int, ...]:
    """counts[n], n = 0 .. k: the c <= n whose slower side, the CPU's c experts or the link's
    n - c records, finishes first; a larger c only where it wins by SPLIT_MARGIN."""
    counts = []
    for n in range(k + 1):
        best, best_time = 0, n * link_seconds
        for c in range(1, min(n, len(cpu_seconds)) + 1):
            t = max(cpu_seconds[c - 1], (n - c) * link_seconds)
            if t < SPLIT_MARGIN * best_time:
                best, best_time = c, t
        counts.append(best)
    return tuple(counts)


def measure_split(compute: Callable[[list[int]], object], pool: torch.Tensor, records: list[int], device, k: int,
                  repeats: int = 5) -> Split:
    """Time `compute(slots)` (the CPU's experts, synchronously) on random `records` for 1 ..
    min(k, MAX_EXPERTS, len(records)) experts, and the link's copy of records from `pool` to `device`."""
    rng = random.Random(0)
    most = min(k, MAX_EXPERTS, len(records))
    cpu = []
    for c in range(1, most + 1):
        times = []
        for _ in range(repeats):
            slots = rng.sample(records, c)
            t0 = time.perf_counter()
            compute(slots)
            times.append(time.perf_counter() - t0)
        cpu.append(statistics.median(times))
    link = link_seconds(pool, device, repeats)
    return Split(split_counts(cpu, link, k), tuple(cpu), link)


def link_seconds(pool: torch.Tensor, device, repeats: int) -> float:
    """Seconds one more record of the pinned pool takes to reach `device`: the slope between copies
    of one record and of up to eight (a copy's fixed cost is paid once per layer, not per record)."""
    m = min(8, pool.shape[0])
    dst = torch.empty(m, pool.shape[1], dtype=pool.dtype, device=device)

    def copy(n: int) -> float:
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            dst[:n].copy_(pool[:n], non_blocking=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return per_record(copy(1), copy(m), m)


def per_record(one: float, many: float, m: int) -> float:
    """Seconds one more record costs, from the time of one record's copy and of m records' (the
    slope; never below 1 ns, which a noisy timing of small records can give)."""
    return max((many - one) / (m - 1), 1e-9) if m > 1 else one


def timing_records(store: ExpertStore, k: int) -> tuple[torch.Tensor, list[int]]:
    """(pool, rows) to time the CPU's experts on: the records the store holds, or while it holds
    fewer than k (a cold cache) as many zero records. Unwritten slots may hold anything, NaNs
    included, and what a record holds does not change the time (zeros stay in the caches of a
    small model's records, so its split then favours the CPU a little)."""
    held = list(store.slots.slot_of.values())
    if len(held) >= k:
        return store.pool, held
    n = min(k, MAX_EXPERTS)
    return torch.zeros(n, store.pool.shape[1], dtype=torch.uint8), list(range(n))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class HostCompute:
    """The CPU's share of each decode layer's misses: the CpuExperts kernel on its worker thread
    (numba, GIL released), pinned buffers for its input and result; up to `per_layer` of them, as
    many as the split measured here says."""

    def __init__(self, kernel: CpuExperts, store: ExpertStore, top_k: int, dtype: torch.dtype, device, per_layer: int):
        self.kernel = kernel
        self.per_layer = per_layer
        H, pin = kernel.layout.hidden_size, torch.device(device).type == "cuda"  # pinned: the copies are asynchronous
        x, (pool, rows) = torch.ones(H), timing_records(store, top_k)
        self.split = measure_split(lambda slots: kernel(pool, slots, [0.0] * len(slots), x), store.pool, rows, device, top_k)
        self.x = torch.empty(H, dtype=dtype, pin_memory=pin)  # the layer's expert input, from its routing sync
        self.weights = torch.empty(top_k, dtype=dtype, pin_memory=pin)  # its routing weights, likewise
        self.gpu_weights = torch.empty(top_k, dtype=torch.float32, pin_memory=pin)  # those of the GPU's share
        self.sum_host = torch.empty(H, dtype=torch.float32, pin_memory=pin)
        self.sum = torch.empty(1, H, dtype=torch.float32, device=device)

    def take(self, n: int) -> int:
        """How many of n host-resident misses the CPU computes."""
        return self.split.take(n, self.per_layer)

    def fetch_inputs(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Queue the copies of x [1, H] and weights [1, k] to the host; the routing sync that
        follows on the same stream waits for them."""
        self.x.copy_(x[0], non_blocking=True)
        self.weights[: weights.shape[1]].copy_(weights[0], non_blocking=True)

    def start(self, store: ExpertStore, on_cpu: dict[int, int], row: list[int], device) -> tuple[Future, list[int], torch.Tensor]:
        """Submit the experts `on_cpu` (expert -> host slot) of the routing `row`; return the Future
        of their weighted sum, the routing columns left to the GPU and those columns' weights on `device`."""
        cpu_sum = self.kernel.submit(store.pool, list(on_cpu.values()), self.weights[[row.index(e) for e in on_cpu]], self.x)
        keep = [j for j, e in enumerate(row) if e not in on_cpu]  # in routing order
        self.gpu_weights[: len(keep)] = self.weights[keep].float()
        return cpu_sum, keep, self.gpu_weights[None, : len(keep)].to(device, non_blocking=True)

    def add_to(self, y: torch.Tensor, cpu_sum: Future) -> None:
        """y [1, H] += the CPU's sum, once it is ready (y in bf16 is rounded twice: GPU share, then this)."""
        self.sum_host.copy_(cpu_sum.result())
        self.sum.copy_(self.sum_host[None], non_blocking=True)
        y.add_(self.sum)


class ResidentCpuShare:
    """The CPU's share of resident decode: server threads over the host tier's records, asked by
    each layer's publish and waited for by its join, both inside the step's graph (no host sync).
    Up to `per_layer` of a layer's host-resident experts, as many as the split measured here says,
    on all cores but one; `act`: the family's expert activation."""

    def __init__(self, tier: "GpuExpertTier", store: ExpertStore, per_layer: int, top_k: int, act: Swiglu = SILU):
        self.server = ExpertServer(tier.layout, store.pool, act=act)
        self.server.start()
        # preloaded: the host tier holds every expert the GPU does not, so the server's own records
        x, held = torch.ones(tier.layout.hidden_size), list(store.slots.slot_of.values())
        self.split = measure_split(lambda slots: self.server.request(slots, [0.0] * len(slots), x), store.pool, held,
                                   tier.pool.device, top_k)
        # slot 0 stands in for the CPU's experts in the GPU's list: any GPU-resident record will do
        self.handoff = HostHandoff(self.server.mail, tier.capacity, tier.host_slot0, 0, per_layer, self.split.counts,
                                   tier.pool.device)

    def check(self) -> None:
        """Raise if a layer's join gave up waiting for the CPU (its output then lacks the CPU's experts)."""
        if seq := self.handoff.failed():
            raise RuntimeError(f"the CPU expert server did not answer request {seq}; run without --cpu-experts")

    def close(self) -> None:
        self.server.stop()
