"""The bandwidths a benchmark's rooflines divide by, measured in the same run: pinned host-to-GPU
copies of expert records (PCIe), device-to-device copies (HBM), parallel O_DIRECT record reads
(disk)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..formats.packed import RecordLayout
from ..formats.safetensors import read_into


@dataclass
class Bandwidths:
    pcie_h2d: float = 0.0  # bytes/s, pinned host -> device, record-sized copies
    hbm_copy: float = 0.0  # bytes/s, read + written
    disk_read: float = 0.0  # bytes/s, O_DIRECT parallel record reads


def hbm_copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return repeats * 2 * nbytes / (time.perf_counter() - t0)


def measure_bandwidths(model_dir: Path, layout: RecordLayout, threads: int = 8) -> Bandwidths:
    bw = Bandwidths()
    rs = layout.record_size
    n = max(8, (1 << 30) // rs)
    host = torch.empty(n, rs, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, rs, dtype=torch.uint8, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        dev[i].copy_(host[i], non_blocking=True)
    torch.cuda.synchronize()
    bw.pcie_h2d = n * rs / (time.perf_counter() - t0)
    del dev
    bw.hbm_copy = hbm_copy_bandwidth()
    # Disk: random records from the last quarter of every layer file (where the disk tier lives),
    # read the way the store reads them (`threads` parallel O_DIRECT preads), about 2 GiB.
    files = sorted((model_dir / "experts").glob("layer_*.bin"))
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
    rng = torch.Generator().manual_seed(3)
    jobs = []
    for _ in range(2 * n):
        fd = fds[int(torch.randint(len(fds), (1,), generator=rng))]
        records = os.fstat(fd).st_size // rs
        jobs.append((fd, int(torch.randint(records * 3 // 4, records, (1,), generator=rng)) * rs))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: None, range(threads)))  # threads started before the clock
        t0 = time.perf_counter()
        list(pool.map(lambda j: read_into(j[1][0], host[j[0] % n], j[1][1]), enumerate(jobs)))
        bw.disk_read = len(jobs) * rs / (time.perf_counter() - t0)
    for fd in fds:
        os.close(fd)
    return bw
