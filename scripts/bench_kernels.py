"""Kernel timings on the GPU: the gathered-experts decode kernels at real shapes, as achieved
bandwidth against a device-to-device copy measured in the same run. Each timing is a CUDA graph of
16 calls over different expert slots (so the 50 MB L2 cannot serve repeats), median of replays."""

import argparse

import torch
import triton

from flashmoe.bench import hbm_copy_bandwidth, random_records
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.moe_gemv import MoeGemv
from flashmoe.kernels.moe_grouped import MoeGrouped


# (block_n, block_k, warps); the sweep of 2026-11-23 (docs/bench) also timed a 3D-unpack variant, since removed
CONFIGS = [(8, 1024, 2), (4, 1024, 1), (4, 2048, 2), (8, 2048, 4), (2, 1024, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=256, help="pool size (rotated so reads miss the L2)")
    ap.add_argument("--only", choices=["gemv", "grouped"], help="time one kernel family")
    args = ap.parse_args()
    hbm = hbm_copy_bandwidth() / 1e9
    print(f"device-to-device copy: {hbm:.0f} GB/s (read + write)")
    if args.only != "grouped":
        gemv_sweep(args, hbm)
    if args.only != "gemv":
        grouped_sweep(args)


def grouped_sweep(args) -> None:
    """Prefill shape: 80 experts with 40 tokens each (2048 tokens x 10 / 512 experts)."""
    print("grouped prefill kernels, 80 experts x 40 tokens: bits  block_m block_n block_k warps stages   ms   TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for bits in (4, 16):
        layout = RecordLayout.build(args.hidden, args.intermediate, bits, 64)
        pool = torch.cat([random_records(layout, 32, gen) for _ in range(3)])
        slots, counts = [i % 96 for i in range(80)], [40] * 80
        x = torch.randn(sum(counts), args.hidden, device="cuda", dtype=torch.bfloat16)
        flops = 2 * sum(counts) * 3 * args.hidden * args.intermediate
        for bm, bn, bk, warps, stages in ((32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 8, 3), (16, 64, 128, 4, 2)):
            grouped = MoeGrouped(layout, bm, bn, bk, warps, stages)
            ms = triton.testing.do_bench(lambda: grouped(x, pool, slots, counts), return_mode="median")
            print(f"{bits:>4} {bm:>8} {bn:>7} {bk:>7} {warps:>5} {stages:>6} {ms:>6.2f} {flops / ms / 1e9:>8.0f}")


def gemv_sweep(args, hbm: float) -> None:
    print("bits  k  block_n block_k warps   us/call   GB/s   % of copy")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for bits in (4, 2, 8, 16):
        layout = RecordLayout.build(args.hidden, args.intermediate, bits, 64)
        pool = torch.cat([random_records(layout, 32, gen) for _ in range(args.slots // 32)])
        x = torch.randn(1, args.hidden, device="cuda", dtype=torch.bfloat16)
        for k in (1, 10):
            for block_n, block_k, warps in CONFIGS:
                gemv = MoeGemv(layout, block_n, block_k, warps)
                w = torch.softmax(torch.randn(1, k, device="cuda"), -1)
                sets = [torch.randperm(args.slots, device="cuda")[:k].view(1, k).to(torch.int32) for _ in range(16)]
                us = triton.testing.do_bench_cudagraph(lambda: [gemv(x, pool, s, w) for s in sets], return_mode="median") * 1e3 / 16
                gbs = k * layout.payload_bytes / us / 1e3
                print(f"{bits:>4} {k:>2} {block_n:>7} {block_k:>7} {warps:>5} {us:>9.1f} {gbs:>6.0f} {100 * gbs / hbm:>8.0f}%")


if __name__ == "__main__":
    main()
