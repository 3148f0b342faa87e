"""N-gram table rows on disk (docs/FORMAT.md, "N-gram tables"), read with parallel `pread`s and kept
in a row cache under a byte budget; a table is never resident as a whole.

The unit of a read is one block (a page of whole rows): a token's hashed rows are scattered over
the table, so each lies on its own page, and a page is the least a disk reads. The unit of the
cache is one row: the neighbours a block brings are other n-grams' rows, almost never wanted next,
so caching whole blocks would spend the budget on them. `fetch` copies cached rows at once and
submits the reads of the rest; `PendingRows.result()` waits for them, checks each block's CRC-32
and admits the rows it read (least recently used rows leave first). Cache bookkeeping happens on
the caller's thread only; reader threads fill buffers that belong to one fetch.

Row ids are on the host (it hashes the n-grams from the ids it fed: models/transformer.py,
Model.start_ngram_reads), and `result()` hands the rows to the model's device in one copy per fetch
(a layer's rows for the step), from pinned memory without blocking the host.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..formats.packed import NGRAM_BLOCK, NgramFile
from ..formats.safetensors import read_into
from .stats import Counters

REBUILD = "re-run flashmoe convert to rebuild the model"


class NgramTableError(RuntimeError):
    pass


@dataclass(slots=True)
class NgramStats(Counters):
    rows: int = 0  # rows looked up (a step's distinct rows, per layer)
    hits: int = 0  # ... found in the row cache
    reads: int = 0  # blocks read from disk, one pread each
    bytes_read: int = 0


class PendingRows:
    """One fetch's rows: cached ones already copied, the rest being read."""

    def __init__(self, store: "NgramRowStore", table: NgramFile, out: torch.Tensor, inverse: torch.Tensor,
                 shape: torch.Size, missed: list[tuple[int, int]], blocks: dict[int, int], staging: torch.Tensor,
                 reads: list[Future], device: torch.device):
        self.store, self.table, self.out, self.inverse, self.shape = store, table, out, inverse, shape
        self.missed, self.blocks, self.staging, self.reads, self.device = missed, blocks, staging, reads, device

    def result(self) -> torch.Tensor:
        """The rows' values [*rows.shape, width] (16-bit as stored, 8-bit decoded to float32), on
        the store's device, once every read is in."""
        for read in self.reads:
            read.result()  # a failed read raises here, on the caller's thread
        if self.missed:
            table, width = self.table, self.table.row_bytes
            rows = self.staging[:, : table.rows_per_block * width].view(len(self.blocks), table.rows_per_block, width)
            where = torch.tensor([i for i, _ in self.missed])
            block = torch.tensor([self.blocks[row // table.rows_per_block] for _, row in self.missed])
            self.out[where] = rows[block, torch.tensor([row % table.rows_per_block for _, row in self.missed])]
            self.store._admit(table.layer, self.missed, self.out)
            self.missed = []
        # The stored bytes, gathered into pinned memory for a GPU: the copy then leaves the host free
        # to queue the layers before the one that reads these rows (the host allocator keeps the
        # buffer until the copy is done); 8-bit rows cross as codes and scales, decoded there.
        rows = torch.empty(self.inverse.numel(), self.table.row_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        torch.index_select(self.out, 0, self.inverse, out=rows)
        return self.table.decode(rows.to(self.device, non_blocking=True)).view(*self.shape, self.table.width)


class NgramRowStore:
    def __init__(self, model_dir: str | Path, tables: tuple[NgramFile, ...], budget_bytes: int,
                 device: torch.device | str = "cpu", io_threads: int = 8, verify: bool = True, direct_io: bool = False):
        """Open each layer's table file (checking its size) and a row cache of at most budget_bytes;
        rows are handed to `device`."""
        self.dir, self.device = Path(model_dir), torch.device(device)
        self.tables = {t.layer: t for t in tables}
        self.fds: dict[int, int] = {}
        self.crcs: dict[int, np.ndarray] = {}
        try:
            for t in tables:
                self._open(t, direct_io)
        except BaseException:
            self.close()
            raise
        self.row_bytes = max((t.row_bytes for t in tables), default=1)
        self.capacity = budget_bytes // self.row_bytes
        self.pool = torch.empty(self.capacity, self.row_bytes, dtype=torch.uint8)
        self.slots: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, row) -> slot, least recent first
        self.verify = verify
        self.stats = NgramStats()
        self.io_threads = io_threads
        self.readers = ThreadPoolExecutor(io_threads, thread_name_prefix="flashmoe-ngram-io")

    def _open(self, table: NgramFile, direct_io: bool) -> None:
        path = self.dir / table.file
        if not path.is_file():
            raise NgramTableError(f"n-gram table file {path} (layer {table.layer}'s n-gram embeddings) is missing; {REBUILD}")
        if (size := path.stat().st_size) != table.file_size:
            raise NgramTableError(
                f"n-gram table file {path} has {size} bytes but layer {table.layer}'s table needs {table.file_size} "
                f"({table.blocks} blocks of {table.block_bytes}, each {table.rows_per_block} rows of {table.row_contents}, "
                f"and their CRC-32s): the file is truncated or corrupt; {REBUILD}"
            )
        # O_DIRECT bypasses the page cache: every miss is a real disk read (honest cold numbers).
        self.fds[table.layer] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct_io else 0))
        # Mapped, not read: the CRC-32s are paged in as the blocks they check are read.
        self.crcs[table.layer] = np.memmap(path, dtype="<u4", mode="r", offset=table.crc_offset, shape=(table.blocks,))

    @property
    def cached_bytes(self) -> int:
        """RAM the row cache holds (its budget, rounded down to whole rows)."""
        return self.pool.numel()

    def fetch(self, layer: int, rows: torch.Tensor) -> PendingRows:
        """Start reading rows (int64 ids of any shape, on the host) of layer's table: cached ones
        are copied now, the others' blocks are read on the reader threads."""
        table = self.tables[layer]
        unique, inverse = torch.unique(rows.reshape(-1), return_inverse=True)
        if unique.numel() and not 0 <= int(unique[0]) <= int(unique[-1]) < table.rows:  # unique sorts
            raise NgramTableError(f"layer {layer}'s n-gram table has {table.rows} rows; row {int(unique[-1])} does not exist")
        out = torch.empty(unique.numel(), table.row_bytes, dtype=torch.uint8)
        hits, slots, missed = [], [], []
        for i, row in enumerate(unique.tolist()):
            slot = self.slots.get((layer, row))
            if slot is None:
                missed.append((i, row))
            else:
                self.slots.move_to_end((layer, row))
                hits.append(i)
                slots.append(slot)
        if hits:
            out[torch.tensor(hits)] = self.pool[torch.tensor(slots), : table.row_bytes]
        blocks = {b: j for j, b in enumerate(sorted({row // table.rows_per_block for _, row in missed}))}
        staging = _page_aligned(len(blocks), table.block_bytes)
        # A task reads a run of blocks: per block, a task's hand-off costs more of the GIL than its
        # pread (a prefill chunk's 32k blocks went at ~8k a second on 16 cores).
        order, size, buffer = list(blocks), max(1, -(-len(blocks) // (4 * self.io_threads))), staging.numpy()
        reads = [self.readers.submit(self._read, table, order[i : i + size], buffer, i) for i in range(0, len(order), size)]
        self.stats.rows += unique.numel()
        self.stats.hits += len(hits)
        self.stats.reads += len(blocks)
        self.stats.bytes_read += len(blocks) * table.block_bytes
        return PendingRows(self, table, out, inverse, rows.shape, missed, blocks, staging, reads, self.device)

    def _read(self, table: NgramFile, blocks: list[int], staging: np.ndarray, first: int) -> None:
        """Runs on a reader thread: blocks into staging rows first.. (this fetch's own buffer), each
        one's CRC-32 checked."""
        fd, crcs, size, path = self.fds[table.layer], self.crcs[table.layer], table.block_bytes, self.dir / table.file
        for j, block in enumerate(blocks, first):
            read_into(fd, staging[j], block * size, path)
            if self.verify and (crc := zlib.crc32(staging[j])) != (want := int(crcs[block])):
                raise NgramTableError(f"n-gram table block {block} in {path} failed its checksum (crc32 {crc:08x}, the "
                                      f"file says {want:08x}): the file is corrupt; {REBUILD}")

    def _admit(self, layer: int, missed: list[tuple[int, int]], out: torch.Tensor) -> None:
        """Keep the rows just read (out[i] for (i, row) in missed), evicting the least recently used.
        Only the last `capacity` of them: more would evict each other within this one call."""
        keep = missed[max(0, len(missed) - self.capacity) :]
        slots = []
        for _, row in keep:
            if len(self.slots) < self.capacity:
                slot = len(self.slots)
            else:
                _, slot = self.slots.popitem(last=False)
            self.slots[(layer, row)] = slot
            slots.append(slot)
        if slots:
            self.pool[torch.tensor(slots), : out.shape[1]] = out[torch.tensor([i for i, _ in keep])]

    def close(self) -> None:
        if hasattr(self, "readers"):
            self.readers.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.crcs.clear()


def _page_aligned(count: int, size: int) -> torch.Tensor:
    """[count, size] bytes starting on a page boundary (what O_DIRECT reads into)."""
    raw = torch.empty(count * size + NGRAM_BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % NGRAM_BLOCK
    return raw[start : start + count * size].view(count, size)
