"""The GPU path for routed experts: a tier of expert slots in GPU memory above the host tier
(the ExpertStore's RAM cache, pinned) and the disk, and the per-layer MoE computation over it.

Decode (a few tokens): one host sync for the routing decision, misses fetched (RAM or disk) and
copied into GPU slots, then the gathered-experts Triton kernels read every expert from its slot.
Prefill (many tokens): tokens sorted by expert once; each needed expert is fetched once per chunk
and multiplied with all of its tokens by the grouped kernels.

Prefetch (opt-in, decode): each MoE layer's dense part also applies the next MoE layer's router to
its residual (NextLayerGuess), so the layer's one host sync brings back its own ids and a guess at
the next layer's. After queueing this layer's kernels the tier starts copying the guessed misses
on a copy stream; they cross PCIe during this layer's experts and the next layer's dense part.
Guesses change only where a record lies and when it is copied, never which experts are computed.

Resident (Engine.preload): every expert sits in a GPU slot or a pinned host-tier slot, and stays.
Pinned memory is mapped into the GPU's address space and the slot pool is placed a whole number of
records away from the host tier's pool, so one slot number addresses either; a device table maps
(layer, expert) to it and the decode kernels read host-resident records in place over PCIe (as fast
as the copy engines: docs/EXPERIMENTS.md entry 30). Nothing is copied and the host never looks at
the routing: a decode step needs no host sync per layer and runs as one CUDA graph. Prefill still
copies (into staging slots only). Unless the policy is static, the placement adapts as decode runs
(policy.AdaptivePlacement): between steps, a layer's host-resident expert that the device's counts
show in clearly more use than one of its GPU-resident experts trades places with it (`swap`).

CPU compute (opt-in, decode, one token): up to `per_layer` of a layer's misses that sit in the host
tier are computed where they lie by the CPU (HostCompute) while PCIe copies the others: the host
reads RAM at tens of GB/s beside the link's ~54. The experts' input and routing weights come back
with the layer's routing sync; the CPU's weighted sum is added to the layer's output after the
GPU's experts, which do not wait for it. With resident experts there is no routing sync: the
layer's graph asks an ExpertServer through a mailbox in pinned memory instead (ResidentCpuShare;
kernels/cpu_expert_server.py and host_handoff.py), and the GPU reads the others over PCIe meanwhile.
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import nullcontext

import numpy as np
import torch

from ..formats.packed import RecordLayout
from ..kernels.cpu_expert_server import ExpertServer
from ..kernels.cpu_experts import CpuExperts
from ..kernels.host_handoff import DEFAULT_SHARE, HostHandoff
from ..kernels.moe_gemv import MoeGemv
from ..kernels.moe_grouped import MoeGrouped
from ..kernels.slot_lookup import lookup_slots
from .expert_store import ExpertStore
from .policy import AdaptivePlacement, SlotMap
from .stats import GpuTierStats

DECODE_MAX_TOKENS = 8  # up to this many tokens per call use the gathered gemv kernels


class NextLayerGuess:
    """The next MoE layer's top-k predicted from this layer's residual after its dense part: that
    layer's router on its post-attention norm of the residual as it stands, i.e. without the
    current layer's routed experts and the next layer's mixer (neither is computed yet). The
    post-attention norm is the one the router was trained behind; scripts/prefetch_accuracy.py
    compares the alternatives on a trained model. Decode only: prefill fetches every expert anyway."""

    def __init__(self, next_layer: torch.nn.Module):
        self.norm, self.moe = next_layer.post_attention_layernorm, next_layer.mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, H] -> predicted ids [T, k] in descending router score, or None for a prefill."""
        if x.shape[0] > DECODE_MAX_TOKENS:
            return None
        return torch.topk(self.moe.gate(self.norm(x)), self.moe.top_k, dim=-1).indices


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
    on all cores but one."""

    def __init__(self, tier: "GpuExpertTier", store: ExpertStore, per_layer: int):
        self.server = ExpertServer(tier.layout, store.pool)
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
        # Resident (make_resident): the slot of every (layer, expert), the lookups per (layer, expert)
        # counted on the device, and the host's view of both for the counters.
        self.table: torch.Tensor | None = None
        self.table_host: np.ndarray | None = None
        self.uses: torch.Tensor | None = None
        self._on_gpu: np.ndarray | None = None
        self.placement: AdaptivePlacement | None = None  # resident placement revised from the counts
        self._uses_seen: np.ndarray | None = None
        self._handed_seen = 0  # experts the CPU share was handed, as last collected
        # queue_stats' copy of the counters (uses, handed to the CPU, the event after them), and
        # whether it holds counts not yet collected
        self._queued: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None = None
        self._queued_pending = False

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
            slot = self.slots.admit((layer, e), pinned) if self.table is None else None
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
        """From now on decode reads every expert of these layers where it lies: in its GPU slot, or
        in place in its host-tier slot. Each must be in one of the two, and no expert leaves them:
        prefill (where copies beat reads in place: the grouped kernel reads each weight tile once,
        too few bytes in flight for PCIe) still copies host-resident experts, into staging slots
        only (place() admits nothing), and every record it asks the host tier for is a hit there.
        `adaptive` (default: unless the policy is static): revise_placement swaps experts between
        the two tiers by their use."""
        if self.host_slot0 is None:
            raise ValueError("resident experts need the GPU slots placed beside the host tier (host_pool)")
        table = np.full((max(layers) + 1, num_experts), -1, dtype=np.int64)
        missing = []
        for layer in layers:
            for e in range(num_experts):
                slot = self.slots.get((layer, e))
                if slot is None and (host := store.slots.get((layer, e))) is not None:
                    slot = self.host_slot0 + host
                if slot is None:
                    missing.append((layer, e))
                else:
                    table[layer, e] = slot
        if missing:
            layer, e = missing[0]
            raise ValueError(f"{len(missing)} experts are in neither the GPU nor the host tier (layer {layer} expert {e}, ...)")
        self.table_host, self._on_gpu = table, (table >= 0) & (table < self.capacity)
        self.table = torch.from_numpy(table).to(self.pool.device)
        if adaptive is None:
            adaptive = self.slots.policy.kind != "static"
        self.placement = AdaptivePlacement(self._on_gpu) if adaptive else None  # keeps _on_gpu up to date
        self.uses = torch.zeros_like(self.table)
        self._uses_seen = np.zeros_like(table)
        self._queued, self._queued_pending = None, False

    def drop_resident(self) -> None:
        if self.cpu_share is not None:
            self.set_cpu_share(None)  # collects the counters first
        else:
            self.collect_stats()
        self.table = self.table_host = self.uses = self._on_gpu = self._uses_seen = self.placement = None

    def swap(self, store: ExpertStore, layer: int, to_gpu: int, to_host: int) -> None:
        """Trade places: expert `to_gpu` (in the host tier) takes the GPU slot of `to_host`, which
        takes its host slot. The copies are queued on the current stream (the first staging slot
        carries a record in transit), so kernels queued before read the old records and those
        queued after the new ones; the resident table changes with them (revise_placement)."""
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

    def revise_placement(self, store: ExpertStore) -> None:
        """Resident and adaptive: do the swaps the placement asks for after the counts collected so
        far. Call between decode steps, after collect_stats: every lookup counted was made under
        the placement before these swaps, and the next step's kernels queue after them."""
        if self.placement is None:
            return
        moves = self.placement.swaps()
        if not moves:
            return
        changed = []
        for layer, to_gpu, to_host in moves:
            gpu, host = self.table_host[layer, to_host], self.table_host[layer, to_gpu]
            self.swap(store, layer, to_gpu, to_host)
            changed += [(layer, to_gpu, gpu), (layer, to_host, host)]
        rows, experts, slots = (np.array(c) for c in zip(*changed))
        self.table_host[rows, experts] = slots
        where, slots = torch.from_numpy(rows * self.table.shape[1] + experts), torch.from_numpy(slots)
        if self.table.is_cuda:  # from pinned memory: the copies stay asynchronous (no host sync)
            where, slots = (t.pin_memory().to(self.table.device, non_blocking=True) for t in (where, slots))
        self.table.view(-1)[where] = slots

    def set_cpu_share(self, share: ResidentCpuShare | None) -> None:
        """Hand resident decode's host-resident experts partly to the CPU (or stop: the server's threads end)."""
        self.collect_stats()  # under the old share: the new one's count of experts handed starts at 0
        if self.cpu_share is not None:
            self.cpu_share.close()
        self.cpu_share, self._handed_seen = share, 0

    def resident_slots(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Slots of decode ids [T, k], looked up on the device and counted there (collect_stats
        reads the counts): no host sync, one launch."""
        return lookup_slots(self.table[layer], self.uses[layer], ids)

    def forget_uncollected(self) -> None:
        """Drop the lookups counted since the last collect_stats (a graph's warm-up run)."""
        if self.uses is not None:
            self.collect_stats(queued_only=True)  # those are real
            self._uses_seen, self._handed_seen = self._read_counters()

    def queue_stats(self) -> None:
        """Queue a copy of the device counters, after the work queued so far, for the next
        collect_stats to add without waiting for the GPU: decode queues one at the end of each
        step's forward and collects it after reading the token, which is the step's one host sync."""
        if self.uses is None:
            return
        if self._queued is None:
            pin = self.uses.is_cuda
            self._queued = (torch.empty(self.uses.shape, dtype=self.uses.dtype, pin_memory=pin),
                            torch.zeros(1, dtype=torch.int64, pin_memory=pin), torch.cuda.Event() if pin else None)
        uses, handed, event = self._queued
        uses.copy_(self.uses, non_blocking=True)
        if self.cpu_share is not None:
            handed.copy_(self.cpu_share.handoff.computed, non_blocking=True)
        if event is not None:
            event.record()
        self._queued_pending = True

    def collect_stats(self, queued_only: bool = False) -> None:
        """Add the resident lookups counted on the device to `stats`: those of queue_stats' copy if
        it holds any (waits for that copy only), then unless `queued_only` all counted since (reads
        the device counters: waits for the queued work)."""
        if self.uses is None:
            return
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
        on_cpu = 0
        if self.cpu_share is not None:
            self.cpu_share.check()  # the reading came after the GPU's work: every join so far has ended
            on_cpu, self._handed_seen = handed - self._handed_seen, handed
        self.stats.hits += int(new[self._on_gpu].sum())
        self.stats.host_reads += int(new[~self._on_gpu].sum()) - on_cpu  # host-resident, read over PCIe
        self.stats.cpu_computed += on_cpu

    def _read_counters(self) -> tuple[np.ndarray, int]:
        """(lookups per (layer, expert), experts handed to the CPU share), read now: waits for the GPU."""
        handed = int(self.cpu_share.handoff.computed) if self.cpu_share is not None else 0
        return self._read_uses(), handed

    def _read_uses(self) -> np.ndarray:
        return self.uses.cpu().numpy().copy()  # on a CPU device .cpu() would share the live counters


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


class GpuRoutedExperts:
    """The routed experts of one layer on the GPU path: the gathered gemv kernels for decode, the
    grouped kernels (all of a batch's experts in two launches) for prefill."""

    def __init__(self, tier: GpuExpertTier, store: ExpertStore, layer: int, gemv: MoeGemv, grouped: MoeGrouped, timer,
                 next_layer: int | None = None):
        self.tier, self.store, self.layer, self.gemv, self.grouped, self.timer = tier, store, layer, gemv, grouped, timer
        self.next_layer = next_layer  # the next MoE layer: where guessed ids (if any) point
        # Routing tables go to the GPU from pinned memory: a pageable source would make the copy
        # synchronous. One buffer per layer is safe to refill next token: a later layer's routing
        # sync has waited for its copy by then.
        self.table = torch.empty(DECODE_MAX_TOKENS * 64, dtype=torch.int32, pin_memory=tier.pool.is_cuda)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """ids [T, k], or [T, 2k] with the next layer's guessed ids after the layer's own (prefetch)."""
        if self.tier.table is not None and ids.shape[0] <= DECODE_MAX_TOKENS:
            with self.timer.section("expert_compute"):
                return self._resident_decode(x, ids, weights).to(x.dtype)
        with self.timer.section("expert_io"):
            ids_host = self._routing_sync(x, ids, weights)
        if ids.shape[0] <= DECODE_MAX_TOKENS:
            return self._decode(x, ids_host, weights)
        return self._prefill(x, ids, ids_host, weights)

    def _routing_sync(self, x, ids, weights) -> torch.Tensor:
        """The one host sync per layer: which experts this layer needs (and the guess); with CPU
        compute of one token, its input and routing weights come back with it."""
        if self.tier.host_compute is not None and x.shape[0] == 1:
            self.tier.host_compute.fetch_inputs(x, weights)
        return ids.cpu()

    def _decode(self, x, ids_host, weights, residual=None, out=None) -> torch.Tensor:
        T, k = weights.shape
        ids_host, guess = ids_host[:, :k], ids_host[:, k:]
        experts = sorted(set(ids_host.flatten().tolist()))
        host = self.tier.host_compute if T == 1 else None
        candidates = self.tier.absent(self.layer, experts) if host is not None else []
        with self.store.resident(self.layer, candidates, host.per_layer if host else 0) as on_cpu:
            if on_cpu:  # started first: the CPU computes while the host queues copies and kernels
                with self.timer.section("expert_io"):
                    cpu_sum, keep, weights = host.start(self.store, on_cpu, ids_host[0].tolist(), x.device)
                    ids_host = ids_host[:, keep]
                    self.tier.stats.cpu_computed += len(on_cpu)
            with self.timer.section("expert_io"):
                slots = self.tier.place(self.layer, [e for e in experts if e not in on_cpu], self.store)
                n = ids_host.shape[1]
                table = self.table[: T * n].view(T, n)
                table.numpy()[:] = [[slots[e] for e in r] for r in ids_host.tolist()]
            with self.timer.section("expert_compute"):
                if n:
                    y = self.gemv(x, self.tier.pool, table.to(x.device, non_blocking=True), weights, residual, out)
                else:  # every expert on the CPU
                    y = out.copy_(residual) if out is not None else torch.zeros(T, x.shape[1], device=x.device)
            if guess.numel() and self.next_layer is not None:
                with self.timer.section("prefetch"):  # after the kernels are queued: the copies overlap them
                    likely_first = list(dict.fromkeys(guess.t().flatten().tolist()))  # each token's best guesses first
                    self.tier.prefetch(self.next_layer, likely_first, self.store)
            if on_cpu:
                with self.timer.section("cpu_experts"):  # waits for the CPU only now, the GPU's share queued
                    host.add_to(y, cpu_sum)
        return y if out is not None else y.to(x.dtype)

    def _resident_decode(self, x, ids, weights, residual=None, out=None) -> torch.Tensor:
        """Every expert read where it lies (make_resident), or for one token partly computed by the
        CPU (cpu_share): no copy, no host sync, no timer section (a profile's sync would break a
        graph capture): capturable."""
        ids, share = ids[:, : weights.shape[1]], self.tier.cpu_share
        if share is not None and x.shape[0] == 1:
            tier = self.tier
            slots, gpu_weights = share.handoff.publish(tier.table[self.layer], tier.uses[self.layer], ids, weights, x)
            y = self.gemv(x, tier.pool, slots, gpu_weights, residual, out)
            share.handoff.join(y)
            return y
        slots = self.tier.resident_slots(self.layer, ids)
        return self.gemv(x, self.tier.pool, slots, weights, residual, out)

    def decode_into(self, x, ids, weights, residual, out) -> None:
        """out = residual + routed experts of x (the graphed decode step's fused form)."""
        if self.tier.table is not None:
            self._resident_decode(x, ids, weights, residual, out)
            return
        with self.timer.section("expert_io"):
            ids_host = self._routing_sync(x, ids, weights)
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
