"""The GPU tier: expert slots in GPU memory above the host tier (the ExpertStore's RAM cache,
pinned) and the disk. `place` copies a layer's misses into slots, `prefetch` copies guessed ones
ahead on a copy stream (experts/routed.py says when), `swap` trades a GPU-resident expert for a
host-resident one. Resident mode (experts/resident.py) and the CPU's share (experts/cpu_share.py)
hang off it.

Pinned memory is mapped into the GPU's address space and the slot pool is placed a whole number of
records away from the host tier's pool (slot_pool), so one slot number addresses either: the
resident decode kernels read host-resident records in place over PCIe.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..formats.packed import RecordLayout
from ..runtime.stats import GpuTierStats
from .cpu_share import HostCompute, ResidentCpuShare
from .policy import SlotMap
from .resident import ResidentTable
from .store import ExpertStore


class GpuExpertTier:
    """`capacity` cached expert slots, `staging` slots for misses the policy does not admit, and
    with prefetch two regions of `prefetch` slots for guessed experts it does not admit (the next
    layer's guesses fill one region while the current layer's kernels read the other).

    Ordering with prefetch (all copies on `copy_stream`, in issue order, so a layer's own misses
    never share PCIe with guesses issued after them):
    - place() makes the copy stream wait for all compute queued so far before copying: a slot it
      or a later prefetch overwrites may be read by queued kernels (evicted residents, reused
      staging / prefetch slots); the current layer's experts are pinned, so only earlier reads
      matter, and prefetch() relies on this wait, which it follows.
    - place() then makes the compute stream wait for every copy queued so far (this layer's misses
      and the prefetches of its experts) before the caller launches kernels.
    - The host waits on `copies_done` before a read into the host tier overwrites a slot (not when
      every record is already there): its pinned slots may be the source of copies in flight."""

    def __init__(self, layout: RecordLayout, capacity: int, staging: int, device, policy: str = "mix", prefetch: int = 0,
                 host_pool: torch.Tensor | None = None):
        self.layout = layout
        self.capacity, self.staging, self.prefetch_slots = capacity, staging, prefetch
        self.pool, self.host_slot0 = slot_pool(capacity + staging + 2 * prefetch, layout.record_size, device, host_pool)
        self.slots = SlotMap(range(capacity), policy)
        self.stats = GpuTierStats()
        on_gpu = torch.device(device).type == "cuda"
        self.copies_done = torch.cuda.Event() if on_gpu else None
        self.copy_stream = torch.cuda.Stream(device) if on_gpu and prefetch else None
        self.in_use: set[tuple[int, int]] = set()  # the last place()'s experts: their kernels may be in flight
        self.guess: tuple[int, set[int]] = (-1, set())  # (layer, experts predicted for it)
        self.ahead: dict[int, int] = {}  # expert -> slot, copied for the guessed layer
        self.region = 0
        self.host_compute: HostCompute | None = None  # set by the engine (--cpu-experts)
        self.cpu_share: ResidentCpuShare | None = None  # likewise, with resident experts
        self.resident: ResidentTable | None = None  # make_resident

    def absent(self, layer: int, experts: list[int]) -> list[int]:
        """Those of the experts that place() would have to copy in (neither cached nor copied ahead)."""
        ahead = self.ahead if self.guess[0] == layer else {}
        return [e for e in experts if (layer, e) not in self.slots and e not in ahead]

    def place(self, layer: int, experts: list[int], store: ExpertStore, cache_reads: bool = True) -> dict[int, int]:
        """GPU slot of each expert (at most `staging` misses per call), copying misses in from the
        host tier (which keeps what it reads from disk unless not `cache_reads`). Kernels queued on
        the current stream after this call see every copy."""
        self.slots.policy.tick()
        guessed, guess = self.guess
        ahead = self.ahead if guessed == layer else {}
        if guessed == layer:
            self.stats.predicted += len(experts)
            self.stats.predicted_right += len(guess.intersection(experts))
        self.guess, self.ahead = (-1, set()), {}
        slots, missing = {}, []
        for e in experts:
            key = (layer, e)
            self.slots.policy.touch(key)
            slot = self.slots.get(key)
            if slot is None:
                slot = ahead.get(e)
            if slot is None:
                missing.append(e)
            else:
                slots[e] = slot
                self.stats.hits += 1
                self.stats.prefetch_hits += e in ahead
        self.stats.misses += len(missing)
        if len(missing) > self.staging:
            raise ValueError(f"{len(missing)} misses at once but only {self.staging} staging slots")
        self.in_use = pinned = {(layer, e) for e in experts}
        staging = iter(range(self.capacity, self.capacity + self.staging))
        for e in missing:
            # Resident (prefill): the slots hold what the device table says, so misses only visit staging.
            slot = self.slots.admit((layer, e), pinned) if self.resident is None else None
            if slot is not None:
                self.stats.admitted += 1
            slots[e] = next(staging) if slot is None else slot
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream())
        self._copy_in(layer, missing, slots, store, cache_reads)
        if self.copy_stream is not None:
            torch.cuda.current_stream().wait_stream(self.copy_stream)
        return slots

    def prefetch(self, layer: int, experts: list[int], store: ExpertStore) -> None:
        """Start copying the guessed experts of `layer` that are not on the GPU, most likely first,
        up to one region of prefetch slots beyond what the policy admits. Call it after place() of
        the layer being computed; the next place(layer) uses what arrived and counts the guess."""
        self.guess = (layer, set(experts))
        self.ahead = {}
        self.region ^= 1
        base = self.capacity + self.staging + self.region * self.prefetch_slots
        free = iter(range(base, base + self.prefetch_slots))
        pinned = self.in_use | {(layer, e) for e in experts}  # never evict what is computed now or guessed
        for e in experts:
            if (layer, e) in self.slots:
                continue
            slot = self.slots.admit((layer, e), pinned)
            if slot is None and (slot := next(free, None)) is None:
                break  # region full: drop the least likely guesses
            self.ahead[e] = slot
        self.stats.prefetched += len(self.ahead)
        self._copy_in(layer, list(self.ahead), self.ahead, store)

    def _copy_in(self, layer: int, experts: list[int], slots: dict[int, int], store: ExpertStore,
                 cache_reads: bool = True) -> None:
        """Queue the copies of these experts' records from the host tier into their slots."""
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext():
            # A read into the host tier may overwrite a slot that a queued copy still reads: wait for
            # the copies then, and only then (records already in the host tier need no wait).
            wait = self.copies_done.synchronize if self.copies_done is not None else None
            for start in range(0, len(experts), store.batch):
                for e, record in store.load(layer, experts[start : start + store.batch], before_read=wait, cache=cache_reads):
                    self.pool[slots[e]].copy_(record, non_blocking=True)
                if self.copies_done is not None:
                    self.copies_done.record()
        self.stats.bytes_copied += len(experts) * self.layout.record_size

    def preload(self, layer: int, experts: list[int], store: ExpertStore) -> None:
        """Fill free slots with these experts (tier placement, warm starts); records read from disk
        on the way pass through the host tier's staging slots and take none of its places."""
        for start in range(0, len(experts), self.staging):
            batch = [e for e in experts[start : start + self.staging] if (layer, e) not in self.slots]
            batch = batch[: len(self.slots.free)]
            self.place(layer, batch, store, cache_reads=False)
        self.stats = GpuTierStats()

    def make_resident(self, store: ExpertStore, layers: list[int], num_experts: int, adaptive: bool | None = None) -> None:
        """From now on decode reads every expert of these layers where it lies (experts/resident.py).
        No expert leaves the two tiers: prefill (where copies beat reads in place: the grouped kernel
        reads each weight tile once, too few bytes in flight for PCIe) still copies host-resident
        experts, into staging slots only (place() admits nothing), and every record it asks the
        host tier for is a hit there. `adaptive` (default: unless the policy is static): swap
        experts between the two tiers by their use."""
        if adaptive is None:
            adaptive = self.slots.policy.kind != "static"
        self.resident = ResidentTable(self, store, layers, num_experts, adaptive)

    def drop_resident(self) -> None:
        if self.cpu_share is not None:
            self.set_cpu_share(None)  # collects the counters first
        elif self.resident is not None:
            self.resident.collect()
        self.resident = None

    def swap(self, store: ExpertStore, layer: int, to_gpu: int, to_host: int) -> None:
        """Trade places: expert `to_gpu` (in the host tier) takes the GPU slot of `to_host`, which
        takes its host slot. The copies are queued on the current stream (the first staging slot
        carries a record in transit), so kernels queued before read the old records and those
        queued after the new ones; the resident table changes with them (ResidentTable.revise)."""
        gpu, host = self.slots.get((layer, to_host)), store.slots.get((layer, to_gpu))
        if gpu is None or host is None:
            raise ValueError(f"layer {layer}: expert {to_host} must be in a GPU slot and expert {to_gpu} in the host tier")
        transit = self.pool[self.capacity]
        transit.copy_(store.pool[host], non_blocking=True)
        store.pool[host].copy_(self.pool[gpu], non_blocking=True)
        self.pool[gpu].copy_(transit, non_blocking=True)
        self.slots.replace((layer, to_host), (layer, to_gpu))
        store.slots.replace((layer, to_gpu), (layer, to_host))
        self.stats.swapped += 1

    def set_cpu_share(self, share: ResidentCpuShare | None) -> None:
        """Hand resident decode's host-resident experts partly to the CPU (or stop: the server's threads end)."""
        if self.resident is not None:
            self.resident.collect()  # under the old share: the new one's count of experts handed starts at 0
            self.resident.share_changed()
        if self.cpu_share is not None:
            self.cpu_share.close()
        self.cpu_share = share


def slot_pool(slots: int, record_size: int, device, host_pool: torch.Tensor | None) -> tuple[torch.Tensor, int | None]:
    """The GPU tier's pool [slots, record_size]; given the host tier's pool, placed a whole number of
    records away from it, so that pool-relative slot host_slot0 + j addresses host record j (pinned
    memory is mapped at the same address in the GPU's space) -> (pool, host_slot0 or None)."""
    if host_pool is None:
        return torch.empty(slots, record_size, dtype=torch.uint8, device=device), None
    raw = torch.empty((slots + 1) * record_size, dtype=torch.uint8, device=device)
    start = (host_pool.data_ptr() - raw.data_ptr()) % record_size
    pool = raw[start : start + slots * record_size].view(slots, record_size)
    return pool, (host_pool.data_ptr() - pool.data_ptr()) // record_size
