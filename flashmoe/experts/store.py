"""Expert records on disk, read with parallel `pread`s into an in-process cache under a byte budget.

One record = one expert = one read. The cache is a pool of record-sized slots; a CachePolicy
(LRU by default) picks what stays. Records in use are pinned so a batch never evicts itself. A
record's CRC32 is checked the first time it is read in this process.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..formats.packed import Manifest
from ..formats.safetensors import read_into
from ..utils import format_bytes
from .policy import SlotMap
from ..runtime.stats import Counters


class ExpertStoreError(RuntimeError):
    pass


class CorruptExpertError(ExpertStoreError):
    pass


class BudgetError(ValueError):
    pass


@dataclass(slots=True)
class StoreStats(Counters):
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertStore:
    @staticmethod
    def keeping_every_record(manifest: Manifest, min_records: int) -> int:
        """The budget in bytes that keeps every expert record: a slot each, and the `min_records`
        staging slots a load's misses go through beside them."""
        return manifest.total_expert_bytes + min_records * manifest.layout.record_size

    def __init__(
        self,
        model_dir: str | Path,
        manifest: Manifest,
        budget_bytes: int,
        min_records: int,
        io_threads: int = 8,
        verify: bool = True,
        pin_memory: bool = False,
        direct_io: bool = False,
        policy: str = "mix",
    ):
        self.dir = Path(model_dir)
        self.layout = manifest.layout
        self.record_size = rs = manifest.layout.record_size
        total = sum(f.num_experts for f in manifest.expert_files)
        # At most every record plus the `batch` staging slots (keeping_every_record's bytes)
        self.capacity = min(budget_bytes // rs, total + min_records)
        if self.capacity < min_records:
            raise BudgetError(
                f"the expert cache budget of {format_bytes(budget_bytes)} holds {budget_bytes // rs} expert records of "
                f"{format_bytes(rs)}, but one token needs {min_records} experts of a layer resident at once: "
                f"raise --host-mem to at least {format_bytes(min_records * rs)}"
            )
        self.files = {f.layer: f for f in manifest.expert_files}
        self.fds: dict[int, int] = {}
        for f in manifest.expert_files:
            path = self.dir / f.file
            if not path.exists():
                raise ExpertStoreError(f"expert file {path} is missing; re-run flashmoe convert")
            size, want = path.stat().st_size, f.num_experts * rs
            if size != want:
                raise ExpertStoreError(
                    f"expert file {path} has {size} bytes but layer {f.layer} needs {want} "
                    f"({f.num_experts} records of {rs}): the file is truncated or corrupt; re-run flashmoe convert"
                )
            # O_DIRECT bypasses the page cache: every miss is a real disk read (honest cold numbers).
            self.fds[f.layer] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct_io else 0))
        # Pinned (page-locked) when a GPU copies from it: only pinned memory copies asynchronously,
        # at full PCIe speed.
        # Slots start on page boundaries (record_size is whole pages), as O_DIRECT requires.
        raw = torch.empty(self.capacity * rs + 4096, dtype=torch.uint8, pin_memory=pin_memory)
        start = -raw.data_ptr() % 4096
        self.pool = raw[start : start + self.capacity * rs].view(self.capacity, rs)
        # `batch` slots are kept back as staging for misses the policy does not keep, so any
        # load() of up to `batch` experts succeeds whatever is cached and pinned.
        self.batch = min_records
        # Every record has a slot of its own beside the staging ones: nothing is ever evicted, so the
        # policy's scores decide nothing.
        self.keeps_every_record = self.capacity - self.batch >= total
        self.slots = SlotMap(range(self.batch, self.capacity), policy)
        self.staging = list(range(self.batch))
        self.pins: dict[tuple[int, int], int] = {}
        self.verify = verify
        self.verified: set[tuple[int, int]] = set()
        self.stats = StoreStats()
        self.readers = ThreadPoolExecutor(io_threads, thread_name_prefix="flashmoe-io")

    def load(self, layer: int, experts: list[int], before_read: Callable[[], None] | None = None, cache: bool = True
             ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (expert, record bytes) for each of up to `batch` experts, cached ones first and the
        rest as their reads complete. All of them stay pinned until the iteration ends.
        `before_read()` runs once before the first read overwrites a slot, and not at all when every
        expert is cached: the GPU tier waits there for copies that may still be reading slots.
        cache=False reads misses into staging slots only (records bound for another tier)."""
        if len(experts) > self.batch:
            raise BudgetError(f"asked for {len(experts)} experts at once; load at most {self.batch}")
        info = self.files[layer]
        bad = [e for e in experts if not 0 <= e < info.num_experts]
        if bad:
            raise ExpertStoreError(f"layer {layer} has {info.num_experts} experts; expert {bad[0]} does not exist")
        keys = [(layer, e) for e in experts]
        self._pin(keys)
        self.slots.policy.tick()
        pending: dict[Future, tuple[int, int]] = {}
        staged: dict[tuple[int, int], int] = {}
        try:
            hits = []
            for key in keys:
                self.slots.policy.touch(key)
                slot = self.slots.get(key)
                if slot is not None:
                    self.stats.hits += 1
                    hits.append((key[1], self.pool[slot]))
                    continue
                self.stats.misses += 1
                if before_read is not None and not pending:
                    before_read()
                slot = self.slots.admit(key, self.pins) if cache else None
                if slot is None:
                    slot = staged[key] = self.staging.pop()
                pending[self.readers.submit(self._read, key, slot)] = key
            yield from hits
            for fut in as_completed(pending):
                yield pending[fut][1], self.pool[fut.result()]
        finally:
            # Wait for every read, even when the caller stopped early: no read may still be writing
            # into a slot once it is unpinned. A failed read frees its slot.
            for fut, key in pending.items():
                try:
                    fut.result()
                    self.stats.bytes_read += self.record_size
                except BaseException:
                    self.slots.forget(key)
            self.stats.evictions = self.slots.evictions
            self.staging.extend(staged.values())
            self._unpin(keys)

    def slot_of(self, record: torch.Tensor) -> int:
        """The pool slot of a record that load() yielded."""
        return (record.data_ptr() - self.pool.data_ptr()) // self.record_size

    def slot_table(self) -> np.ndarray:
        """[layers, experts] -> the pool slot caching each record, -1 where none: kept up to date in
        place as the cache changes (policy.SlotMap.table)."""
        return self.slots.table((max(self.files) + 1, max(f.num_experts for f in self.files.values())))

    def used_in_place(self, layer: int, ids: torch.Tensor, distinct: int) -> None:
        """Count a use of the `distinct` cached records among ids that a kernel found in
        `slot_table` and read in place, as `load` counts its hits: one step of the policy's clock,
        each record touched (~5 us a layer: skipped where the store keeps every record)."""
        if not self.keeps_every_record:
            policy = self.slots.policy
            policy.tick()
            for e in dict.fromkeys(ids.flatten().tolist()):
                policy.touch((layer, e))
        self.stats.hits += distinct

    @contextmanager
    def resident(self, layer: int, experts: list[int], limit: int) -> Iterator[dict[int, int]]:
        """Up to `limit` of these experts that are already in RAM -> their slots in `pool`, pinned
        (never evicted) until the block ends. Nothing is read: the caller computes them where they lie."""
        found: dict[int, int] = {}
        for e in experts:
            if len(found) == limit:
                break
            if (slot := self.slots.get((layer, e))) is not None:
                found[e] = slot
        keys = [(layer, e) for e in found]
        for key in keys:
            self.slots.policy.touch(key)
        self._pin(keys)
        try:
            yield found
        finally:
            self._unpin(keys)

    def _pin(self, keys: list[tuple[int, int]]) -> None:
        """Keep these records where they are (the policy never evicts a pinned key); counted, so
        overlapping users nest."""
        for key in keys:
            self.pins[key] = self.pins.get(key, 0) + 1

    def _unpin(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]

    def _read(self, key: tuple[int, int], slot: int) -> int:
        """Runs on a reader thread: fill the slot, check the record's CRC32 on its first read."""
        layer, expert = key
        info = self.files[layer]
        buf = self.pool[slot]
        read_into(self.fds[layer], buf, expert * self.record_size, self.dir / info.file)
        if self.verify and key not in self.verified:
            crc = zlib.crc32(buf.numpy())
            if crc != info.crc32[expert]:
                raise CorruptExpertError(
                    f"expert record layer {layer} expert {expert} in {self.dir / info.file} failed its checksum "
                    f"(crc32 {crc:08x}, manifest says {info.crc32[expert]:08x}): the file is corrupt; "
                    "re-run flashmoe convert"
                )
            self.verified.add(key)  # set.add is atomic under the GIL
        return slot

    def close(self) -> None:
        self.readers.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
