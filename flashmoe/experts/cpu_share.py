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

from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from ..kernels.cpu_expert_server import ExpertServer
from ..kernels.cpu_experts import CpuExperts
from ..kernels.host_handoff import DEFAULT_SHARE, HostHandoff
from ..layers.mlp import SILU, Swiglu
from .store import ExpertStore

if TYPE_CHECKING:
    from .tier import GpuExpertTier


class HostCompute:
    """The CPU's share of each decode layer's misses: the CpuExperts kernel on its worker thread
    (numba, GIL released), pinned buffers for its input and result."""

    def __init__(self, kernel: CpuExperts, top_k: int, dtype: torch.dtype, device, per_layer: int):
        self.kernel = kernel
        self.per_layer = per_layer
        H, pin = kernel.layout.hidden_size, torch.device(device).type == "cuda"  # pinned: the copies are asynchronous
        self.x = torch.empty(H, dtype=dtype, pin_memory=pin)  # the layer's expert input, from its routing sync
        self.weights = torch.empty(top_k, dtype=dtype, pin_memory=pin)  # its routing weights, likewise
        self.gpu_weights = torch.empty(top_k, dtype=torch.float32, pin_memory=pin)  # those of the GPU's share
        self.sum_host = torch.empty(H, dtype=torch.float32, pin_memory=pin)
        self.sum = torch.empty(1, H, dtype=torch.float32, device=device)

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
    Up to `per_layer` of a layer's host-resident experts, DEFAULT_SHARE of them (host_handoff.py),
    on all cores but one; `act`: the family's expert activation."""

    def __init__(self, tier: "GpuExpertTier", store: ExpertStore, per_layer: int, act: Swiglu = SILU):
        self.server = ExpertServer(tier.layout, store.pool, act=act)
        # slot 0 stands in for the CPU's experts in the GPU's list: any GPU-resident record will do
        self.handoff = HostHandoff(self.server.mail, tier.capacity, tier.host_slot0, 0, per_layer, DEFAULT_SHARE,
                                   tier.pool.device)
        self.server.start()

    def check(self) -> None:
        """Raise if a layer's join gave up waiting for the CPU (its output then lacks the CPU's experts)."""
        if seq := self.handoff.failed():
            raise RuntimeError(f"the CPU expert server did not answer request {seq}; run without --cpu-experts")

    def close(self) -> None:
        self.server.stop()
