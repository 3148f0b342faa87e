"""Can the GPU's kernels read expert records straight from pinned host memory, and how fast?

The question behind resident decode (docs/EXPERIMENTS.md): if the gathered-experts kernels read
host-resident records over PCIe themselves ("zero-copy"), no host sync per layer is needed and a
whole decode step can be one CUDA graph. That pays only if such reads come close to the copy
engines' rate. Parts (each in its own process: a bad address kills the CUDA context):

  dma      pinned host -> device copies of record-sized chunks (what the tier does today)
  stream   a Triton kernel summing a pinned host buffer, over block sizes and warps
  gemv     the gathered-experts kernels with some of the k slots pointing into host memory,
           checked bit for bit against the same records in GPU memory, then timed
"""

import argparse
import time

import torch
import triton
import triton.language as tl

GiB = 1 << 30


@triton.jit
def _sum_kernel(src_ptr, out_ptr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for s in range(STEPS):
        acc += tl.load(src_ptr + base + s * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def dma(args) -> None:
    from flashmoe.formats.packed import RecordLayout

    rs = RecordLayout.build(4096, 1024, 4, 64).record_size
    n = GiB // rs
    host = torch.empty(n, rs, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            dev[i].copy_(host[i], non_blocking=True)
        torch.cuda.synchronize()
    print(f"dma: {n} copies of {rs} B pinned -> device: {n * rs / (time.perf_counter() - t0) / 1e9:.1f} GB/s")


def stream(args) -> None:
    words = GiB // 4
    host = torch.randint(-1000, 1000, (words,), dtype=torch.int32).pin_memory()
    want = int(host.sum())
    dev = host.cuda()
    print("stream: kernel summing 1 GiB; source   BLOCK  STEPS warps   GB/s   ok")
    for block, steps, warps in ((1024, 4, 4), (2048, 8, 4), (4096, 4, 8), (512, 16, 2), (1024, 16, 4), (4096, 16, 8)):
        programs = words // (block * steps)
        out = torch.empty(programs, dtype=torch.int32, device="cuda")
        for name, src in (("device", dev), ("pinned host", host)):
            fn = lambda: _sum_kernel[(programs,)](src, out, BLOCK=block, STEPS=steps, num_warps=warps)
            fn()
            ok = int(out.sum()) == want
            ms = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median")
            print(f"{name:>20} {block:>6} {steps:>6} {warps:>5} {GiB / ms / 1e6:>6.1f}   {ok}")


def host_pool_like(gpu_pool: torch.Tensor, records: int) -> tuple[torch.Tensor, int]:
    """A pinned host pool whose records sit a whole number of records away from gpu_pool's start,
    so slot numbers relative to gpu_pool address them -> (host pool view, slot of its record 0)."""
    rs = gpu_pool.shape[1]
    raw = torch.empty((records + 1) * rs, dtype=torch.uint8, pin_memory=True)
    start = (gpu_pool.data_ptr() - raw.data_ptr()) % rs
    view = raw[start : start + records * rs].view(records, rs)
    return view, (view.data_ptr() - gpu_pool.data_ptr()) // rs


def gemv(args) -> None:
    from flashmoe.bench.synthesis import random_records
    from flashmoe.formats.packed import RecordLayout
    from flashmoe.kernels.moe_gemv import MoeGemv

    gen = torch.Generator(device="cuda").manual_seed(0)
    k, sets = 10, 16
    print("gemv: k=10, n of them read from pinned host memory: bits  n   us/call   host MB/call   host GB/s  identical")
    for bits in (4, 2):
        layout = RecordLayout.build(4096, 1024, bits, 64)
        raw = torch.empty(257 * layout.record_size, dtype=torch.uint8, device="cuda")
        off = -raw.data_ptr() % 4096  # page-aligned GPU pool -> page-aligned host records
        gpu_pool = raw[off : off + 256 * layout.record_size].view(256, layout.record_size)
        gpu_pool.copy_(torch.cat([random_records(layout, 32, gen) for _ in range(8)]))
        host_pool, host0 = host_pool_like(gpu_pool, 256)
        host_pool.copy_(gpu_pool.cpu())
        run = MoeGemv(layout)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        w = torch.softmax(torch.randn(1, k, device="cuda"), -1)
        for n_host in (0, 1, 2, 4, 10):
            slot_sets, ref_sets = [], []
            for _ in range(sets):
                s = torch.randperm(256, device="cuda")[:k].to(torch.int32).view(1, k)
                ref_sets.append(s)
                hs = s.clone()
                hs[0, :n_host] += host0  # the same records, read from the host copy
                slot_sets.append(hs)
            same = all(torch.equal(run(x, gpu_pool, h, w), run(x, gpu_pool, r, w)) for h, r in zip(slot_sets, ref_sets))
            us = triton.testing.do_bench_cudagraph(lambda: [run(x, gpu_pool, s, w) for s in slot_sets], return_mode="median") * 1e3 / sets
            mb = n_host * layout.payload_bytes / 1e6
            print(f"{bits:>46} {n_host:>2} {us:>9.1f} {mb:>14.1f} {mb / us * 1e3 if n_host else 0:>11.1f}  {same}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["dma", "stream", "gemv"])
    args = ap.parse_args()
    globals()[args.part](args)
