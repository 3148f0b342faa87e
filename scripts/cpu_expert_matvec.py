"""Can the CPU compute a host-resident expert miss faster than PCIe copies it to the GPU?
docs/EXPERIMENTS.md entry 22.

Builds random 4-bit expert records of the 397B shape (flashmoe.formats.packed.RecordLayout, MLX
affine groups of 64), runs one decode token through them with flashmoe.kernels.cpu_experts (a
fused numba kernel that reads the packed words, bf16 scales and biases straight from the record),
checks it against the PyTorch reference (layout.weights + swiglu_expert in fp32) and times it on
1..16 threads for 1..8 experts at once, through CpuExperts as the runtime calls it (its worker
thread included). Prints the effective GB/s of record bytes beside PCIe and the machine's memory
read bandwidth, and the best split of a layer's misses between CPU compute and PCIe copies.

numba is an optional flashmoe dependency; this script needs it (pip install 'flashmoe[cpu-experts]').
Usage (repo root, flashmoe not installed is fine):
    python3 scripts/cpu_expert_matvec.py [--json out.json] [--pcie-gbs 53.7] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import flashmoe from the repo root

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:
    sys.exit("cpu_expert_matvec.py needs numba: pip install 'flashmoe[cpu-experts]'")

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.cpu_experts import CpuExperts
from flashmoe.layers.mlp import swiglu_expert

HIDDEN, INTER, BITS, GROUP = 4096, 1024, 4, 64


# ---------------------------------------------------------------- memory bandwidth

@njit(parallel=True, fastmath=True, cache=False)
def parallel_sum(a):
    """Memory read bandwidth: a reduction touches each byte once."""
    s = np.float32(0.0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


# ---------------------------------------------------------------- records and reference

def random_pool(layout: RecordLayout, n: int, seed: int = 0) -> np.ndarray:
    """n records [n, record_size] uint8: random codes, scales/biases as flashmoe.bench.random_records
    (rows zero-mean, unit gain) but with random per-group variation, so a kernel that reads the
    wrong group's scale or bias fails the check."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (n, layout.record_size), dtype=np.uint8)
    code_std = (15 * 17 / 12) ** 0.5
    seg = {s.name: s for s in layout.segments}
    for proj, k in (("gate_up_proj", HIDDEN), ("down_proj", INTER)):
        s, b = seg[f"{proj}.scales"], seg[f"{proj}.biases"]
        count = s.nbytes // 2
        scale = (rng.uniform(0.5, 1.5, (n, count)) / (code_std * k**0.5)).astype(np.float32)
        bias = -scale * 7.5 * rng.uniform(0.9, 1.1, (n, count)).astype(np.float32)
        for arr, sg in ((scale, s), (bias, b)):
            bf = torch.from_numpy(arr).to(torch.bfloat16).view(torch.int16).numpy()
            pool[:, sg.offset : sg.offset + sg.nbytes] = bf.view(np.uint8)
    return pool


def reference(layout: RecordLayout, record: np.ndarray, x: np.ndarray) -> np.ndarray:
    gate_up, down = layout.weights(torch.from_numpy(record), torch.float32)
    return swiglu_expert(torch.from_numpy(x)[None], gate_up, down)[0].numpy()


# ---------------------------------------------------------------- timing

def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--pcie-gbs", type=float, default=53.7, help="host->GPU copy rate to compare with (GB/s)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per configuration (median reported)")
    ap.add_argument("--pool", type=int, default=128, help="records to cycle through (more than the caches hold)")
    ap.add_argument("--bw-gb", type=float, default=2.0, help="array size for the memory bandwidth test (GB)")
    ap.add_argument("--threads", default="1,4,8,16", help="numba thread counts to try (capped at the cores)")
    ap.add_argument("--misses", default="2,4.2,6", help="misses per layer for the split")
    args = ap.parse_args()

    max_threads = numba.config.NUMBA_NUM_THREADS
    threads = sorted({min(int(t), max_threads) for t in args.threads.split(",")})
    layout = RecordLayout.build(HIDDEN, INTER, BITS, GROUP)
    rb = layout.record_size
    pcie_ms = rb / args.pcie_gbs / 1e6
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    print(f"numba {numba.__version__}, {max_threads} threads available, {os.cpu_count()} CPUs, {cpu}")
    print(f"record {rb:,} bytes; PCIe at {args.pcie_gbs} GB/s: {pcie_ms:.3f} ms per record")

    t0 = time.perf_counter()
    pool = random_pool(layout, args.pool)
    pool_t = torch.from_numpy(pool)
    x = np.random.default_rng(1).standard_normal(HIDDEN).astype(np.float32)
    x_t = torch.from_numpy(x)
    print(f"{args.pool} random records built in {time.perf_counter() - t0:.1f} s "
          f"({args.pool * rb / 1e9:.2f} GB, cycled so timed reads come from RAM, not cache)")

    # Correctness first (this also compiles): a wrong fast kernel must not produce a number.
    experts = {t: CpuExperts(layout, threads=t) for t in {*threads, max_threads}}
    t0 = time.perf_counter()
    experts[max_threads].warmup()
    print(f"JIT compile (or numba's cache) + first run {time.perf_counter() - t0:.1f} s "
          f"(threading layer {numba.threading_layer()})")
    worst = 0.0
    for e in range(4):
        out = experts[max_threads](pool_t, [e], [1.0], x_t).numpy()
        ref = reference(layout, pool[e], x)
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        worst = max(worst, err)
        # fp32 sums: ~1e-6; the 4-bit rows' integer dot products on a two-step int8 input (EXPERIMENTS 118): ~1e-4
        assert np.isfinite(err) and err < 1e-3, f"fused kernel wrong on record {e}: relative error {err:.2e}"
    print(f"check vs PyTorch reference (layout.weights + swiglu_expert, fp32): worst relative error {worst:.1e} OK")
    overhead_ms = median_ms(lambda: experts[max_threads](pool_t, [], [], x_t), args.repeats)
    print(f"a call with no experts (hand-off to the worker thread and back): {overhead_ms:.3f} ms")

    # Memory read bandwidth of this machine, for scale.
    n_bw = int(args.bw_gb * 1e9) // 4
    big = np.ones(n_bw, np.float32)
    np_ms = median_ms(lambda: big.sum(), 3)
    numba.set_num_threads(max_threads)
    parallel_sum(big[:1024])
    nb_ms = median_ms(lambda: parallel_sum(big), 5)
    bw = {"numpy_sum_1thread_gbs": big.nbytes / np_ms / 1e6, "numba_sum_gbs": big.nbytes / nb_ms / 1e6,
          "numba_sum_threads": max_threads}
    del big
    print(f"memory read: numpy sum {bw['numpy_sum_1thread_gbs']:.1f} GB/s (1 thread), "
          f"numba parallel sum {bw['numba_sum_gbs']:.1f} GB/s ({max_threads} threads)")

    cursor = [0]

    def run(ex: CpuExperts, n_exp: int, batched: bool):
        """One timed call: the next n_exp records of the pool, all at once or one call each."""
        start = cursor[0]
        cursor[0] = (start + n_exp) % (args.pool - 8)
        sel = list(range(start, start + n_exp))
        if batched:
            return lambda: ex(pool_t, sel, [1.0] * n_exp, x_t)
        return lambda: [ex(pool_t, [e], [1.0], x_t) for e in sel]

    def timed(ex: CpuExperts, n_exp: int, batched: bool) -> float:
        for _ in range(2):  # warm-up at this thread count
            run(ex, n_exp, batched)()
        calls = [run(ex, n_exp, batched) for _ in range(args.repeats)]
        it = iter(calls)
        return median_ms(lambda: next(it)(), args.repeats)

    rows = []
    print(f"\n{'threads':>7} {'experts':>7} {'mode':>10} {'ms':>8} {'ms/expert':>9} {'GB/s':>7} {'vs PCIe':>8}")
    grid = [(t, n, True) for t in threads for n in (1, 2, 4, 8)]
    grid += [(max_threads, n, True) for n in (3, 5, 6, 7)]  # for the split
    grid += [(max_threads, n, False) for n in (2, 4, 8)]  # one call per expert: what batching buys
    for t, n, batched in grid:
        ms = timed(experts[t], n, batched)
        gbs = n * rb / ms / 1e6
        rows.append({"threads": t, "experts": n, "batched": batched, "ms": ms, "ms_per_expert": ms / n, "gbs": gbs})
        print(f"{t:>7} {n:>7} {'batched' if batched else 'one/call':>10} {ms:8.3f} {ms / n:9.3f} {gbs:7.1f} "
              f"{gbs / args.pcie_gbs:7.2f}x")


    # Plain PyTorch: dequantize the whole record to fp32, then two matmuls (what the CPU path does).
    torch.set_num_threads(max_threads)
    torch_ms = median_ms(lambda: swiglu_expert(x_t[None], *layout.weights(pool_t[0], torch.float32)),
                         max(3, args.repeats // 4))
    print(f"\nPyTorch dequantize + matmul, {max_threads} threads: {torch_ms:.2f} ms per expert "
          f"({rb / torch_ms / 1e6:.1f} GB/s): it writes and rereads 4x the record as fp32, hence a fused kernel")

    # Split: c misses on the CPU (all at once, max threads) while PCIe copies the other m - c.
    t_cpu = {0: 0.0}
    t_cpu.update({r["experts"]: r["ms"] for r in rows if r["threads"] == max_threads and r["batched"]})
    splits = []
    print(f"\nsplit of m misses per layer ({max_threads} threads, PCIe {pcie_ms:.3f} ms/record; the CPU's "
          f"result, {HIDDEN * 4 // 1024} KB, then crosses PCIe too: negligible)")
    for m in (float(v) for v in args.misses.split(",")):
        options = [(max(t_cpu[c], (m - c) * pcie_ms), c) for c in sorted(t_cpu) if c <= m]
        best_ms, best_c = min(options)
        splits.append({"misses": m, "all_pcie_ms": m * pcie_ms, "cpu_experts": best_c, "ms": best_ms,
                       "speedup": m * pcie_ms / best_ms})
        print(f"  m={m:g}: all PCIe {m * pcie_ms:.3f} ms; best CPU takes {best_c}, PCIe {m - best_c:g}: "
              f"{best_ms:.3f} ms per layer ({m * pcie_ms / best_ms:.2f}x)")

    if args.json:
        args.json.write_text(json.dumps({
            "cpu": cpu, "record_bytes": rb, "pcie_gbs": args.pcie_gbs, "pcie_ms_per_record": pcie_ms, "cpus": os.cpu_count(),
            "numba_threads": max_threads, "check_rel_err": worst, "call_overhead_ms": overhead_ms,
            "memory_read": bw, "rows": rows,
            "torch_ms_per_expert": torch_ms, "splits": splits, "repeats": args.repeats,
        }, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
