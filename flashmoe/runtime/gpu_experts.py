"""The GPU path for routed experts: a tier of expert slots in GPU memory above the host tier
(the ExpertStore's RAM cache, pinned) and the disk, and the per-layer MoE computation over it.

Decode (a few tokens): one host sync for the routing decision, misses fetched (RAM or disk) and
copied into GPU slots, then the gathered-experts Triton kernels read every expert from its slot.
Prefill (many tokens): tokens sorted by expert once; each needed expert is fetched once per chunk
and multiplied with all of its tokens by the grouped kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.packed import RecordLayout
from ..kernels.moe_gemv import MoeGemv
from ..kernels.moe_grouped import MoeGrouped
from .expert_store import ExpertStore
from .policy import SlotMap

DECODE_MAX_TOKENS = 8  # up to this many tokens per call use the gathered gemv kernels


@dataclass(slots=True)
class GpuTierStats:
    hits: int = 0
    misses: int = 0
    admitted: int = 0
    bytes_copied: int = 0  # host -> GPU

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class GpuExpertTier:
    """`capacity` cached expert slots plus `staging` slots for misses the policy does not admit."""

    def __init__(self, layout: RecordLayout, capacity: int, staging: int, device, policy: str = "mix"):
        self.layout = layout
        self.capacity, self.staging = capacity, staging
        self.pool = torch.empty(capacity + staging, layout.record_size, dtype=torch.uint8, device=device)
        self.slots = SlotMap(range(capacity), policy)
        self.stats = GpuTierStats()
        self.copies_done = torch.cuda.Event() if torch.device(device).type == "cuda" else None

    def place(self, layer: int, experts: list[int], store: ExpertStore) -> dict[int, int]:
        """GPU slot of each expert (at most `staging` misses per call), copying misses in from the
        host tier. The copies are queued on the current stream, so kernels queued after them see them."""
        if self.copies_done is not None:
            # The host slots of the previous call's copies may be reused by this call's reads.
            self.copies_done.synchronize()
        self.slots.policy.tick()
        slots, missing = {}, []
        for e in experts:
            key = (layer, e)
            self.slots.policy.touch(key)
            if key in self.slots:
                slots[e] = self.slots.get(key)
                self.stats.hits += 1
            else:
                missing.append(e)
        self.stats.misses += len(missing)
        if len(missing) > self.staging:
            raise ValueError(f"{len(missing)} misses at once but only {self.staging} staging slots")
        pinned = {(layer, e) for e in experts}
        staging = iter(range(self.capacity, self.capacity + self.staging))
        for e in missing:
            slot = self.slots.admit((layer, e), pinned)
            if slot is not None:
                self.stats.admitted += 1
            slots[e] = next(staging) if slot is None else slot
        for start in range(0, len(missing), store.batch):
            if start and self.copies_done is not None:
                self.copies_done.synchronize()  # the next batch of reads reuses these host slots
            for e, record in store.load(layer, missing[start : start + store.batch]):
                self.pool[slots[e]].copy_(record, non_blocking=True)
            if self.copies_done is not None:
                self.copies_done.record()
        self.stats.bytes_copied += len(missing) * self.layout.record_size
        return slots

    def preload(self, layer: int, experts: list[int], store: ExpertStore) -> None:
        """Fill free slots with these experts (benchmark tier placement, warm starts)."""
        for start in range(0, len(experts), self.staging):
            batch = [e for e in experts[start : start + self.staging] if (layer, e) not in self.slots]
            batch = batch[: len(self.slots.free)]
            self.place(layer, batch, store)
        self.stats = GpuTierStats()


class GpuRoutedExperts:
    """The routed experts of one layer on the GPU path: the gathered gemv kernels for decode, the
    grouped kernels (all of a batch's experts in two launches) for prefill."""

    def __init__(self, tier: GpuExpertTier, store: ExpertStore, layer: int, gemv: MoeGemv, grouped: MoeGrouped, timer):
        self.tier, self.store, self.layer, self.gemv, self.grouped, self.timer = tier, store, layer, gemv, grouped, timer
        # Routing tables go to the GPU from pinned memory: a pageable source would make the copy
        # synchronous. One buffer per layer is safe to refill next token: a later layer's routing
        # sync has waited for its copy by then.
        self.table = torch.empty(DECODE_MAX_TOKENS * 64, dtype=torch.int32, pin_memory=tier.pool.is_cuda)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self.timer.section("expert_io"):
            ids_host = ids.cpu()  # the one host sync per layer: which experts this layer needs
        if ids.shape[0] <= DECODE_MAX_TOKENS:
            return self._decode(x, ids_host, weights)
        return self._prefill(x, ids, ids_host, weights)

    def _decode(self, x, ids_host, weights, residual=None, out=None) -> torch.Tensor:
        with self.timer.section("expert_io"):
            slots = self.tier.place(self.layer, sorted(set(ids_host.flatten().tolist())), self.store)
            T, k = ids_host.shape
            table = self.table[: T * k].view(T, k)
            table.numpy()[:] = [[slots[e] for e in row] for row in ids_host.tolist()]
        with self.timer.section("expert_compute"):
            y = self.gemv(x, self.tier.pool, table.to(x.device, non_blocking=True), weights.float(), residual, out)
            return y if out is not None else y.to(x.dtype)

    def decode_into(self, x, ids, weights, residual, out) -> None:
        """out = residual + routed experts of x (the graphed decode step's fused form)."""
        with self.timer.section("expert_io"):
            ids_host = ids.cpu()
        self._decode(x, ids_host, weights, residual, out)

    def _prefill(self, x, ids, ids_host, weights) -> torch.Tensor:
        T, k = ids.shape
        flat = ids_host.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, on the host
        counts = torch.bincount(flat)
        needed = torch.nonzero(counts).flatten().tolist()
        starts = torch.cumsum(counts, 0) - counts
        per_pair = torch.empty(T * k, x.shape[1], dtype=x.dtype, device=x.device)  # each pair written once
        order_dev = order.to(x.device)
        flat_weights = weights.flatten()
        for b in range(0, len(needed), self.tier.staging):
            batch = needed[b : b + self.tier.staging]
            with self.timer.section("expert_io"):
                slots = self.tier.place(self.layer, batch, self.store)
            with self.timer.section("expert_compute"):
                # the batch's pairs are contiguous in `order`: its experts are consecutive ids
                pairs = order_dev[int(starts[batch[0]]) : int(starts[batch[-1]] + counts[batch[-1]])]
                y = self.grouped(x[pairs // k], self.tier.pool, [slots[e] for e in batch], counts[batch].tolist())
                per_pair[pairs] = (y * flat_weights[pairs, None].float()).to(x.dtype)
        # Sum each token's k contributions in routing order: deterministic, no atomics.
        with self.timer.section("expert_compute"):
            return per_pair.view(T, k, -1).float().sum(1).to(x.dtype)
