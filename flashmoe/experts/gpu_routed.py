"""The GPU path's routed experts of a layer (the model's RoutedExperts, moe/block.py): the GPU tier
(experts/tier.py) and the Triton kernels.

Decode (a few tokens): one host sync for the routing decision, misses fetched (RAM or disk) and
copied into GPU slots, then the gathered-experts Triton kernels read every expert from its slot.
Prefill (many tokens): tokens sorted by expert once; each needed expert is fetched once per chunk
and multiplied with all of its tokens by the grouped kernels. Resident (experts/resident.py): every
expert read where it lies, no host sync.

Prefetch (opt-in, decode): each MoE layer's dense part also applies the next MoE layer's router to
its residual (NextLayerGuess), so the layer's one host sync brings back its own ids and a guess at
the next layer's. After queueing this layer's kernels the tier starts copying the guessed misses
on a copy stream; they cross PCIe during this layer's experts and the next layer's dense part.
Guesses change only where a record lies and when it is copied, never which experts are computed.
"""

from __future__ import annotations

import torch

from ..kernels.moe_gemv import MoeGemv
from ..kernels.moe_grouped import MoeGrouped
from .store import ExpertStore
from .tier import GpuExpertTier
from ..runtime.graphs import GRAPH_MAX_TOKENS

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
        return self.moe.route(self.moe.project(self.norm(x))[0])[1]


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

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can hold this layer's decode: resident experts need no host sync."""
        return self.tier.resident is not None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) the routed experts of x [T, H] (into `out` if given). ids [T, k],
        or [T, 2k] with the next layer's guessed ids after the layer's own (prefetch)."""
        if ids.shape[0] > DECODE_MAX_TOKENS:
            with self.timer.section("expert_io"):
                ids_host = self._routing_sync(x, ids, weights)
            y = self._prefill(x, ids, ids_host, weights)
            y = y if residual is None else residual + y
            return y if out is None else out.copy_(y)
        if self.capturable:  # no timer section: a profile's sync would break a graph capture
            y = self._resident_decode(x, ids, weights, residual, out)
            return y if out is not None else y.to(x.dtype)
        with self.timer.section("expert_io"):
            ids_host = self._routing_sync(x, ids, weights)
        return self._decode(x, ids_host, weights, residual, out)

    def graphed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + the routed experts of a decode graph's tokens (runtime/graphs.py; capturable
        only): the gathered gemv for up to GRAPH_MAX_TOKENS, where an eager call of more than
        DECODE_MAX_TOKENS would take the grouped kernels."""
        assert self.capturable and ids.shape[0] <= GRAPH_MAX_TOKENS
        return self._resident_decode(x, ids, weights, residual).to(x.dtype)

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
        # of the misses already in RAM, as many as the measured split gives the CPU
        limit = host.take(sum((self.layer, e) in self.store.slots for e in candidates)) if host else 0
        with self.store.resident(self.layer, candidates, limit) as on_cpu:
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
                    base = residual if residual is not None else torch.zeros(T, x.shape[1], dtype=x.dtype, device=x.device)
                    y = out.copy_(base) if out is not None else base.clone()
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
        ids, share, resident = ids[:, : weights.shape[1]], self.tier.cpu_share, self.tier.resident
        if share is not None and x.shape[0] == 1:
            slots, gpu_weights = share.handoff.publish(resident.table[self.layer], resident.uses[self.layer], ids, weights, x)
            y = self.gemv(x, self.tier.pool, slots, gpu_weights, residual, out)
            share.handoff.join(y)
            return y
        return self.gemv(x, self.tier.pool, resident.slots(self.layer, ids), weights, residual, out)

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
