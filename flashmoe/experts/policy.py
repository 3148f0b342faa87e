"""Which experts a cache tier keeps: LRU, LFU, a mix of the two, or a static set.

Every (layer, expert) has a score that only grows when it is used: LRU scores by last use, LFU by
use count (ties by recency), "mix" by count * 10 + last use (in layer steps). Eviction takes the
lowest score among residents. A miss is admitted only if it scores at least as high as the
victim it would replace (LRU always admits). "static" never replaces a resident: the tier keeps
what it was first filled with, which is optimal when routing has no locality (a random model).

Resident decode (every expert in the GPU or the host tier, nothing copied on a miss) has no
admissions to decide; AdaptivePlacement decides instead which experts trade tiers as it runs.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

POLICIES = ("lru", "lfu", "mix", "static")
Key = tuple[int, int]


class CachePolicy:
    def __init__(self, kind: str = "mix"):
        if kind not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}, not {kind!r}")
        self.kind = kind
        self.clock = 0
        self.count: dict[Key, int] = defaultdict(int)  # kept for non-residents too (admission needs it)
        self.last: dict[Key, int] = {}
        self.residents: set[Key] = set()
        self.heap: list[tuple[float, int, Key]] = []  # (score, last, key); stale entries skipped lazily

    def score(self, key: Key) -> float:
        last = self.last.get(key, -1)
        if self.kind == "lru":
            return last
        if self.kind in ("lfu", "static"):
            return self.count[key] + last / (self.clock + 2)  # recency only breaks ties
        return self.count[key] * 10 + last

    def tick(self) -> None:
        """One step of the clock (a layer's routing decision)."""
        self.clock += 1

    def touch(self, key: Key) -> None:
        self.count[key] += 1
        self.last[key] = self.clock
        if key in self.residents:
            heapq.heappush(self.heap, (self.score(key), self.clock, key))

    def insert(self, key: Key) -> None:
        self.residents.add(key)
        heapq.heappush(self.heap, (self.score(key), self.last.get(key, -1), key))

    def remove(self, key: Key) -> None:
        self.residents.discard(key)

    def victim(self, pinned: set[Key]) -> Key | None:
        """The resident with the lowest score, excluding `pinned`; None if there is none."""
        skipped = []
        found = None
        while self.heap:
            score, last, key = heapq.heappop(self.heap)
            if key not in self.residents or (score, last) != (self.score(key), self.last.get(key, -1)):
                continue  # stale entry
            if key in pinned:
                skipped.append((score, last, key))
                continue
            found = key
            heapq.heappush(self.heap, (score, last, key))  # still resident until remove()
            break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        if len(self.heap) > 8 * max(1, len(self.residents)) + 1024:
            self.heap = [(self.score(k), self.last.get(k, -1), k) for k in self.residents]
            heapq.heapify(self.heap)
        return found

    def admit(self, key: Key, victim: Key) -> bool:
        if self.kind == "static":
            return False
        return self.kind == "lru" or self.score(key) >= self.score(victim)


class SlotMap:
    """Which key sits in which slot of a tier's pool, with a CachePolicy deciding what stays."""

    def __init__(self, slots: range, policy: str):
        self.slot_of: dict[Key, int] = {}
        self.free = list(reversed(slots))
        self.policy = CachePolicy(policy)
        self.evictions = 0
        self._table: np.ndarray | None = None  # `table`'s array, once asked for

    def table(self, shape: tuple[int, int]) -> np.ndarray:
        """The map as an array [layers, experts] of slots, -1 where a key has none: what a compiled
        kernel looks keys up in. Made at the first call, then kept up to date in place."""
        if self._table is None:
            self._table = np.full(shape, -1, dtype=np.int64)
            for key, slot in self.slot_of.items():
                self._table[key] = slot
        return self._table

    def _set(self, key: Key, slot: int) -> None:
        self.slot_of[key] = slot
        if self._table is not None:
            self._table[key] = slot

    def _pop(self, key: Key) -> int | None:
        slot = self.slot_of.pop(key, None)
        if slot is not None and self._table is not None:
            self._table[key] = -1
        return slot

    def get(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def admit(self, key: Key, pinned) -> int | None:
        """A slot for a missed key, evicting the policy's victim if the policy lets the key in;
        None if it stays out (the caller then uses a staging slot)."""
        if self.free:
            slot = self.free.pop()
        else:
            victim = self.policy.victim(pinned)
            if victim is None or not self.policy.admit(key, victim):
                return None
            slot = self._pop(victim)
            self.policy.remove(victim)
            self.evictions += 1
        self._set(key, slot)
        self.policy.insert(key)
        return slot

    def replace(self, old: Key, new: Key) -> int:
        """Put `new` in the slot `old` holds (the caller moves the record) -> that slot."""
        slot = self._pop(old)
        self._set(new, slot)
        self.policy.remove(old)
        self.policy.insert(new)
        return slot

    def forget(self, key: Key) -> None:
        slot = self._pop(key)
        if slot is not None:
            self.policy.remove(key)
            self.free.append(slot)


class AdaptivePlacement:
    """Which experts resident decode (Engine.preload) keeps in GPU slots, revised as it runs.

    Preloading fills each layer's GPU slots with whatever experts it is given; the rest are read
    over PCIe from pinned host memory. A trained model's routing is skewed (some experts serve many
    times their share), so the best placement holds each layer's most used experts on the GPU. The
    device counts every lookup; `observe` collects each decode step's counts, and every `every`
    steps `swaps` folds them into a heat per (layer, expert) that halves every `half_life` steps
    and names pairs to exchange: a host-resident expert whose heat exceeds a GPU-resident one's by
    `confidence` standard deviations of the difference (a decayed count's variance is about half
    its value). Under uniform routing the hottest host expert and the coldest GPU expert of 512
    stay within that band, so a random model swaps (almost) nothing; a popular expert crosses it
    within a few hundred steps. At most `per_check` swaps per check, layers visited in turn: each
    swap moves two records over PCIe. Checking every few steps keeps the host's cost per decode
    step to an array addition."""

    def __init__(self, on_gpu: np.ndarray, half_life: float = 1024.0, confidence: float = 4.0, per_check: int = 16,
                 every: int = 4):
        self.on_gpu = on_gpu  # [layers, experts] bool, updated in place; rows of layers without experts all False
        self.heat = np.zeros(on_gpu.shape)
        self.recent = np.zeros(on_gpu.shape)  # counts observed since the last check
        self.steps = 0  # ... over this many steps
        self.decay = 0.5 ** (1.0 / half_life)
        self.confidence, self.per_check, self.every = confidence, per_check, every
        self.next_layer = 0  # where the next check starts looking: no layer waits behind busier ones

    def observe(self, uses: np.ndarray) -> None:
        """Add one decode step's lookups [layers, experts] (its counts, not running totals)."""
        self.recent += uses
        self.steps += 1

    def swaps(self) -> list[tuple[int, int, int]]:
        """Every `every` steps, up to `per_check` (layer, expert to the GPU, expert to the host)
        pairs, each significant; `on_gpu` (the caller's array) is updated as if they were done."""
        if self.steps < self.every:
            return []
        self.heat *= self.decay**self.steps
        self.heat += self.recent
        self.recent[:] = 0
        self.steps = 0
        on_host = ~self.on_gpu  # stale for a layer only after its swaps, when it is not visited again
        hottest = np.max(self.heat, axis=1, where=on_host, initial=-np.inf)
        coldest = np.min(self.heat, axis=1, where=self.on_gpu, initial=np.inf)
        with np.errstate(invalid="ignore"):  # layers without experts on one side: inf - inf
            due = np.flatnonzero(self._significant(hottest, coldest))
        if not len(due):
            return []
        due = np.roll(due, -int(np.searchsorted(due, self.next_layer)))
        out: list[tuple[int, int, int]] = []
        for layer in due:
            heat = self.heat[layer]
            ups, downs = np.flatnonzero(on_host[layer]), np.flatnonzero(self.on_gpu[layer])
            for up, down in zip(ups[np.argsort(-heat[ups])], downs[np.argsort(heat[downs])]):
                if len(out) == self.per_check or not self._significant(heat[up], heat[down]):
                    break
                out.append((int(layer), int(up), int(down)))
                self.on_gpu[layer, up], self.on_gpu[layer, down] = True, False
            if len(out) == self.per_check:
                self.next_layer = int(layer) + 1
                break
        return out

    def current_heat(self) -> np.ndarray:
        """The heat as of now: the folded heat decayed to this step, plus the counts since."""
        return self.heat * self.decay**self.steps + self.recent

    def _significant(self, hot, cold):
        return hot - cold > self.confidence * np.sqrt((hot + cold) / 2 + 1)
