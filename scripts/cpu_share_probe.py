"""Does the CPU's share of resident decode pay on this machine? (docs/EXPERIMENTS.md entry 39)

Resident decode reads a layer's host-resident experts over PCIe (~131 us per 4-bit 397B record
at ~54 GB/s); the CPU could compute some of them from RAM at the same time, handed over through
the mailbox of kernels/cpu_expert_server.py without any host sync. This times, on the 397B's
expert shape (4-bit, groups of 64), with fresh random records:

  cpu     the server alone, asked from the host: n experts per request
  layer   one layer's routed experts as resident decode runs them, in a CUDA graph: publish
          (lookup, split), the gathered kernels over k slots of which `host` lie in pinned host
          memory, join; the CPU taking c of the host-resident ones (c = 0: no server involved)

Usage: python3 scripts/cpu_share_probe.py [--threads N] [--k 10]
"""

import argparse
import statistics
import time

import torch

from flashmoe.bench.synthesis import random_records
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.cpu_expert_server import PHASES, ExpertServer
from flashmoe.kernels.host_handoff import HostHandoff
from flashmoe.kernels.moe_gemv import MoeGemv
from flashmoe.experts.tier import slot_pool


def timed(fn, reps: int) -> float:
    """Median seconds of fn() (synchronized) over reps."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    layout = RecordLayout.build(4096, 1024, 4, 64)
    H, k, rs = layout.hidden_size, args.k, layout.record_size
    host_records = 96  # 680 MB: far past the CPU's caches
    gen = torch.Generator().manual_seed(1)
    host_pool = random_records(layout, host_records, gen).pin_memory()
    gpu_slots = k
    pool, host0 = slot_pool(gpu_slots, rs, "cuda", host_pool)
    pool.copy_(random_records(layout, k, gen))
    server = ExpertServer(layout, host_pool, args.threads)
    server.start()
    print(f"record {rs / 1e6:.2f} MB, {server.threads} CPU threads, k={k}")

    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 4):
        ms, before = [], server.phase_counters()
        for rep in range(12):
            slots = torch.randperm(host_records, generator=g)[:n].tolist()
            x = torch.randn(H, generator=g)
            t0 = time.perf_counter()
            server.request(slots, [0.1] * n, x)
            ms.append((time.perf_counter() - t0) * 1e3)
        print(f"cpu: {n} experts per request {statistics.median(ms[2:]):.3f} ms (min {min(ms):.3f}), "
              f"{n * rs / statistics.median(ms[2:]) / 1e6:.1f} GB/s; per thread, mean (max) ms: " + ", ".join(
                  f"{name} {t.mean() * 1e3:.3f} ({t.max() * 1e3:.3f})"
                  for name, t in zip(PHASES, ExpertServer.phase_seconds(before, server.phase_counters()).T)))

    gemv = MoeGemv(layout)
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(residual)
    weights = torch.full((1, k), 0.1, device="cuda", dtype=torch.bfloat16)
    ids = torch.arange(k, device="cuda")[None]
    uses = torch.zeros(k, dtype=torch.int64, device="cuda")
    print("layer: host-resident of k, CPU takes c -> us per layer (graph replay: median of 20 replays of 10 layers)")
    for n_host in sorted({0, 2, 3, 4, 5, 6} & set(range(k + 1))):
        base = None
        for c in range(0, min(n_host, 3) + 1):
            # routed experts 0 .. k-1: the first k - n_host on the GPU, the rest in host records, other
            # ones in each of the 10 layers (so that the CPU reads them from DRAM, not from its caches)
            tables = [torch.tensor(list(range(k - n_host)) + [host0 + p for p in torch.randperm(host_records, generator=g)[:n_host]],
                                   dtype=torch.int64, device="cuda") for _ in range(10)]
            handoff = HostHandoff(server.mail, k, host0, 0, max_cpu=max(c, 1), counts=[min(n, c) for n in range(k + 1)], device="cuda")

            def layer(table):
                slots, w = handoff.publish(table, uses, ids, weights, x)
                gemv(x, pool, slots, w, residual, out)
                handoff.join(out)

            layer(tables[0])
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for table in tables:
                    layer(table)
            us = timed(graph.replay, 20) / 10 * 1e6
            base = base or us
            print(f"layer: host {n_host} c {c}: {us:7.1f} us ({us / base:.2f}x c=0)"
                  + (f"  [failed {handoff.failed()}]" if handoff.failed() else ""))
    server.stop()


if __name__ == "__main__":
    main()
