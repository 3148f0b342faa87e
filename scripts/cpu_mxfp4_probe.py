"""What the CPU kernel reads per second from gpt-oss's MXFP4 records, beside the affine 4-bit
kernel on the same shape and the machine's memory read rate (docs/EXPERIMENTS.md entry 65).

One decode token through k experts of gpt-oss-120b's shape (H = I = 2880, expert biases, the
clamped SwiGLU) from random records (flashmoe.bench.synthesis.random_records), through
CpuExperts as the engine calls it; the PyTorch path (dequantize, matmul) for scale.

Usage: python3 scripts/cpu_mxfp4_probe.py [--threads 2] [--k 4] [--calls 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import flashmoe from the repo root

import torch

from flashmoe.bench.synthesis import random_records
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.cpu_experts import CpuExperts
from flashmoe.layers.mlp import Swiglu, swiglu_expert

H = I = 2880
ACT = Swiglu(1.702, 7.0)


def median_ms(fn, calls: int) -> float:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3  # the first two warm caches and threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--calls", type=int, default=12)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    big = torch.ones(256 << 20)  # 1 GiB of fp32, summed: every byte read once
    read_gbs = big.numel() * 4 / median_ms(lambda _: big.sum(), 5) / 1e6
    print(f"memory read (torch.sum, {a.threads} threads): {read_gbs:.1f} GB/s")
    x = torch.randn(H, generator=torch.Generator().manual_seed(0))
    slots = 16  # more records than the caches hold: each call reads from DRAM
    for scheme, group in (("mxfp4", 32), ("affine", 32)):
        layout = RecordLayout.build(H, I, 4, group, with_bias=True, scheme=scheme)
        pool = random_records(layout, slots, torch.Generator().manual_seed(1))
        experts = CpuExperts(layout, a.threads, ACT)
        experts.warmup()
        pick = lambda i: [(a.k * i + j) % slots for j in range(a.k)]  # noqa: E731
        ms = median_ms(lambda i: experts(pool, pick(i), [1 / a.k] * a.k, x), a.calls)
        mb = a.k * layout.payload_bytes / 1e6

        def pytorch(i: int) -> None:
            for s in pick(i):
                swiglu_expert(x[None], *layout.weights(pool[s], torch.float32), ACT, layout.biases(pool[s], torch.float32))

        ref_ms = median_ms(pytorch, 5)
        print(f"{scheme:7s} numba {ms:7.1f} ms for {mb:.1f} MB = {mb / ms:5.2f} GB/s ({mb / ms / read_gbs:.0%} of the read rate); "
              f"PyTorch path {ref_ms:.0f} ms")


if __name__ == "__main__":
    main()
