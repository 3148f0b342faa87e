"""Resident experts (Engine.preload): every expert sits in a GPU slot or a pinned host-tier slot, and
stays. A device table maps (layer, expert) to its slot (one slot number addresses either pool:
experts/tier.py slot_pool), and the decode kernels read host-resident records in place over PCIe
(as fast as the copy engines: docs/EXPERIMENTS.md entry 30). Nothing is copied and the host never
looks at the routing: a decode step needs no host sync per layer and runs as one CUDA graph.
Prefill still copies (into staging slots only).

The lookups are counted on the device (kernels/slot_lookup.py) and read back into the tier's stats
without a host sync of their own (`queue`, then `collect` after the step's token is read). Unless
the policy is static, the placement adapts (policy.AdaptivePlacement): between steps, a layer's
host-resident expert that the counts show in clearly more use than one of its GPU-resident experts
trades places with it (`revise`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels.slot_lookup import lookup_slots
from .policy import AdaptivePlacement
from .store import ExpertStore

if TYPE_CHECKING:
    from .tier import GpuExpertTier


class ResidentTable:
    """The slot of every (layer, expert) of `layers`, in the GPU tier or in place in the host tier;
    each must be in one of the two. `adaptive`: revise swaps experts between them by their use."""

    def __init__(self, tier: GpuExpertTier, store: ExpertStore, layers: list[int], num_experts: int, adaptive: bool):
        if tier.host_slot0 is None:
            raise ValueError("resident experts need the GPU slots placed beside the host tier (host_pool)")
        self.tier = tier
        table = np.full((max(layers) + 1, num_experts), -1, dtype=np.int64)
        missing = []
        for layer in layers:
            for e in range(num_experts):
                slot = tier.slots.get((layer, e))
                if slot is None and (host := store.slots.get((layer, e))) is not None:
                    slot = tier.host_slot0 + host
                if slot is None:
                    missing.append((layer, e))
                else:
                    table[layer, e] = slot
        if missing:
            layer, e = missing[0]
            raise ValueError(f"{len(missing)} experts are in neither the GPU nor the host tier (layer {layer} expert {e}, ...)")
        self.host_table, self.on_gpu = table, (table >= 0) & (table < tier.capacity)
        self.table = torch.from_numpy(table).to(tier.pool.device)
        self.placement = AdaptivePlacement(self.on_gpu) if adaptive else None  # keeps on_gpu up to date
        self.uses = torch.zeros_like(self.table)  # lookups per (layer, expert), counted on the device
        self._uses_seen = np.zeros_like(table)
        self._handed_seen = 0  # experts the CPU share was handed, as last collected
        # queue's copy of the counters (uses, handed to the CPU, the event after them), and whether
        # it holds counts not yet collected
        self._queued: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None = None
        self._queued_pending = False

    def slots(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Slots of decode ids [T, k], looked up on the device and counted there: no host sync, one launch."""
        return lookup_slots(self.table[layer], self.uses[layer], ids)

    def revise(self, store: ExpertStore) -> None:
        """Adaptive: do the swaps the placement asks for after the counts collected so far. Call
        between decode steps, after `collect`: every lookup counted was made under the placement
        before these swaps, and the next step's kernels queue after them."""
        if self.placement is None:
            return
        moves = self.placement.swaps()
        if not moves:
            return
        changed = []
        for layer, to_gpu, to_host in moves:
            gpu, host = self.host_table[layer, to_host], self.host_table[layer, to_gpu]
            self.tier.swap(store, layer, to_gpu, to_host)
            changed += [(layer, to_gpu, gpu), (layer, to_host, host)]
        rows, experts, slots = (np.array(c) for c in zip(*changed))
        self.host_table[rows, experts] = slots
        where, slots = torch.from_numpy(rows * self.table.shape[1] + experts), torch.from_numpy(slots)
        if self.table.is_cuda:  # from pinned memory: the copies stay asynchronous (no host sync)
            where, slots = (t.pin_memory().to(self.table.device, non_blocking=True) for t in (where, slots))
        self.table.view(-1)[where] = slots

    # -- counters ----------------------------------------------------------------------------------
    def share_changed(self) -> None:
        """The CPU share was replaced: its count of experts handed starts again at 0."""
        self._handed_seen = 0

    def forget_uncollected(self) -> None:
        """Drop the lookups counted since the last collect (a graph's warm-up run)."""
        self.collect(queued_only=True)  # those are real
        self._uses_seen, self._handed_seen = self._read_counters()

    def queue(self) -> None:
        """Queue a copy of the device counters, after the work queued so far, for the next collect
        to add without waiting for the GPU: decode queues one at the end of each step's forward and
        collects it after reading the token, which is the step's one host sync."""
        if self._queued is None:
            pin = self.uses.is_cuda
            self._queued = (torch.empty(self.uses.shape, dtype=self.uses.dtype, pin_memory=pin),
                            torch.zeros(1, dtype=torch.int64, pin_memory=pin), torch.cuda.Event() if pin else None)
        uses, handed, event = self._queued
        uses.copy_(self.uses, non_blocking=True)
        if self.tier.cpu_share is not None:
            handed.copy_(self.tier.cpu_share.handoff.computed, non_blocking=True)
        if event is not None:
            event.record()
        self._queued_pending = True

    def collect(self, queued_only: bool = False) -> None:
        """Add the lookups counted on the device to the tier's stats: those of queue's copy if it
        holds any (waits for that copy only), then unless `queued_only` all counted since (reads
        the device counters: waits for the queued work)."""
        if self._queued_pending:
            uses, handed, event = self._queued
            if event is not None:
                event.synchronize()
            self._add(uses.numpy().copy(), int(handed))
            self._queued_pending = False
        if not queued_only:
            self._add(*self._read_counters())

    def _add(self, uses: np.ndarray, handed: int) -> None:
        """Add what a reading of the counters holds beyond the previous reading (each reading is
        taken after all the GPU work queued before it)."""
        new, self._uses_seen = uses - self._uses_seen, uses
        if self.placement is not None:
            self.placement.observe(new)
        on_cpu, share, stats = 0, self.tier.cpu_share, self.tier.stats
        if share is not None:
            share.check()  # the reading came after the GPU's work: every join so far has ended
            on_cpu, self._handed_seen = handed - self._handed_seen, handed
        stats.hits += int(new[self.on_gpu].sum())
        stats.host_reads += int(new[~self.on_gpu].sum()) - on_cpu  # host-resident, read over PCIe
        stats.cpu_computed += on_cpu

    def _read_counters(self) -> tuple[np.ndarray, int]:
        """(lookups per (layer, expert), experts handed to the CPU share), read now: waits for the GPU."""
        share = self.tier.cpu_share
        handed = int(share.handoff.computed) if share is not None else 0
        return self.uses.cpu().numpy().copy(), handed  # on a CPU device .cpu() would share the live counters
