"""Which experts a cache tier keeps: LRU, LFU, a mix of the two, or a static set.

Every (layer, expert) has a score that only grows when it is used: LRU scores by last use, LFU by
use count (ties by recency), "mix" by count * 10 + last use (in layer steps). Eviction takes the
lowest score among residents. A miss is admitted only if it scores at least as high as the
victim it would replace (LRU always admits). "static" never replaces a resident: the tier keeps
what it was first filled with, which is optimal when routing has no locality (a random model).
"""

from __future__ import annotations

import heapq
from collections import defaultdict

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
            slot = self.slot_of.pop(victim)
            self.policy.remove(victim)
            self.evictions += 1
        self.slot_of[key] = slot
        self.policy.insert(key)
        return slot

    def forget(self, key: Key) -> None:
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.policy.remove(key)
            self.free.append(slot)
