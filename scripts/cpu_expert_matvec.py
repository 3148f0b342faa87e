"""Can the CPU compute a host-resident expert miss faster than PCIe copies it to the GPU?
docs/EXPERIMENTS.md entry 22.

Builds random 4-bit expert records of the 397B shape (flashmoe.formats.packed.RecordLayout, MLX
affine groups of 64), runs one decode token through them with a fused numba kernel that reads the
packed words, bf16 scales and biases straight from the record, checks it against the PyTorch
reference (layout.weights + swiglu_expert in fp32) and times it on 1..16 threads for 1..8 experts
at once. Prints the effective GB/s of record bytes beside PCIe and the machine's memory read
bandwidth, and the best split of a layer's misses between CPU compute and PCIe copies.

numba is not a flashmoe dependency; this script needs it (pip install numba).
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
    sys.exit("cpu_expert_matvec.py needs numba (not a flashmoe dependency): pip install numba")

from flashmoe.formats.packed import RecordLayout
from flashmoe.layers.moe import swiglu_expert

HIDDEN, INTER, BITS, GROUP = 4096, 1024, 4, 64
ROWS_PER_BLOCK = 32  # rows one parallel task computes: enough to amortize the scale conversion


# ---------------------------------------------------------------- the fused kernel

def prepare_input(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [K] -> (xp, xs). Byte b of a group's 32 code bytes holds inputs 2b (low nibble) and 2b+1
    (high nibble): xp lays each group of 64 out as [the 32 even inputs, the 32 odd ones] so the
    inner loop reads bytes and inputs at unit stride (SIMD-friendly). xs: the per-group sums of x,
    for the bias term (sum_j (q_j s + b) x_j = s * sum_j q_j x_j + b * sum_j x_j)."""
    g = x.reshape(-1, 32, 2)  # [group, byte, nibble]
    return np.ascontiguousarray(g.transpose(0, 2, 1)).reshape(-1), x.reshape(-1, GROUP).sum(1)


@njit(fastmath=True, cache=False)
def _rows(rec8, rec16, w_off, s_off, b_off, k, r0, r1, xp, xs, out, sbuf):
    """out[r] = sum_j w[r, j] x[j] for rows r0..r1 of one projection of one record, read as bytes
    (rec8) and halfwords (rec16); w_off is in bytes, s_off and b_off in halfwords."""
    row_bytes, groups = k // 2, k // GROUP
    n = (r1 - r0) * groups
    # bf16 -> fp32 is the bf16 bits in the high half of an fp32: convert the block's scales and
    # biases at once through a uint32 buffer viewed as float32 (numba cannot bit-cast a scalar).
    scales = rec16[s_off + r0 * groups : s_off + r1 * groups]  # sliced for the reason given below
    biases = rec16[b_off + r0 * groups : b_off + r1 * groups]
    for t in range(n):
        sbuf[t] = np.uint32(scales[t]) << 16
        sbuf[n + t] = np.uint32(biases[t]) << 16
    sb = sbuf.view(np.float32)
    for r in range(r0, r1):
        # Slice the row first: indexing it with loop counters lets LLVM see non-negative,
        # contiguous indices (an offset it cannot prove >= 0 makes numba's wraparound turn the
        # loads into per-element gathers, 6x slower).
        row = rec8[w_off + r * row_bytes : w_off + (r + 1) * row_bytes]
        acc = np.float32(0.0)
        for g in range(groups):
            dot = np.float32(0.0)
            for b in range(32):
                v = row[g * 32 + b]
                # numba widens integer ops to int64; the explicit int32 lets LLVM keep 16 lanes
                # of int32 per AVX-512 vector (without it: 8 lanes of int64, 3-4x slower).
                lo, hi = np.int32(v & 15), np.int32(v >> 4)
                dot += np.float32(lo) * xp[g * 64 + b] + np.float32(hi) * xp[g * 64 + 32 + b]
            t = (r - r0) * groups + g
            acc += sb[t] * dot + sb[n + t] * xs[g]
        out[r] = acc


@njit(parallel=True, fastmath=True, cache=False, nogil=True)
def experts_forward(p8, p16, ids, offs, xp, xs, out):
    """The SwiGLU experts `ids` (rows of the record pool) on one token; out [len(ids), HIDDEN].
    Parallel over (expert, block of rows), so several misses fill 16 threads better than one.
    offs: byte/halfword offsets of gate_up.{weight,scales,biases}, down.{weight,scales,biases}."""
    ne = ids.shape[0]
    two_i = 2 * INTER
    h = np.empty((ne, two_i), np.float32)
    bpe = two_i // ROWS_PER_BLOCK
    for task in prange(ne * bpe):
        j, blk = task // bpe, task % bpe
        sbuf = np.empty(2 * ROWS_PER_BLOCK * (HIDDEN // GROUP), np.uint32)
        _rows(p8[ids[j]], p16[ids[j]], offs[0], offs[1], offs[2], HIDDEN, blk * ROWS_PER_BLOCK,
              (blk + 1) * ROWS_PER_BLOCK, xp, xs, h[j], sbuf)
    # SwiGLU, then the same permutation and group sums for the down projection's input.
    ap = np.empty((ne, INTER), np.float32)
    asum = np.zeros((ne, INTER // GROUP), np.float32)
    for j in prange(ne):
        for c in range(INTER):
            gate = h[j, c]
            a = gate / (np.float32(1.0) + np.exp(-gate)) * h[j, INTER + c]
            ap[j, (c // 64) * 64 + (c % 2) * 32 + (c % 64) // 2] = a  # prepare_input's order
            asum[j, c // 64] += a
    bpe = HIDDEN // ROWS_PER_BLOCK
    for task in prange(ne * bpe):
        j, blk = task // bpe, task % bpe
        sbuf = np.empty(2 * ROWS_PER_BLOCK * (INTER // GROUP), np.uint32)
        _rows(p8[ids[j]], p16[ids[j]], offs[3], offs[4], offs[5], INTER, blk * ROWS_PER_BLOCK,
              (blk + 1) * ROWS_PER_BLOCK, ap[j], asum[j], out[j], sbuf)


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


def segment_offsets(layout: RecordLayout) -> np.ndarray:
    seg = {s.name: s for s in layout.segments}
    offs = []
    for proj in ("gate_up_proj", "down_proj"):
        offs.append(seg[f"{proj}.weight"].offset)
        offs += [seg[f"{proj}.{t}"].offset // 2 for t in ("scales", "biases")]
    return np.array(offs, np.int64)


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
    p8, p16 = pool, pool.view(np.uint16)  # the same bytes as codes and as bf16 bits
    offs = segment_offsets(layout)
    x = np.random.default_rng(1).standard_normal(HIDDEN).astype(np.float32)
    xp, xs = prepare_input(x)
    print(f"{args.pool} random records built in {time.perf_counter() - t0:.1f} s "
          f"({args.pool * rb / 1e9:.2f} GB, cycled so timed reads come from RAM, not cache)")

    # Correctness first (this also compiles): a wrong fast kernel must not produce a number.
    t0 = time.perf_counter()
    ids = np.arange(4, dtype=np.int64)
    out = np.empty((len(ids), HIDDEN), np.float32)
    experts_forward(p8, p16, ids, offs, xp, xs, out)
    print(f"JIT compile + first run {time.perf_counter() - t0:.1f} s (threading layer {numba.threading_layer()})")
    worst = 0.0
    for j, e in enumerate(ids):
        ref = reference(layout, pool[e], x)
        err = float(np.linalg.norm(out[j] - ref) / np.linalg.norm(ref))
        worst = max(worst, err)
        assert np.isfinite(err) and err < 1e-4, f"fused kernel wrong on record {e}: relative error {err:.2e}"
    print(f"check vs PyTorch reference (layout.weights + swiglu_expert, fp32): worst relative error {worst:.1e} OK")

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

    def run(n_exp: int, batched: bool):
        """One timed call: the next n_exp records of the pool, all at once or one call each."""
        start = cursor[0]
        cursor[0] = (start + n_exp) % (args.pool - 8)
        sel = np.arange(start, start + n_exp, dtype=np.int64)
        o = np.empty((n_exp, HIDDEN), np.float32)
        if batched:
            return lambda: experts_forward(p8, p16, sel, offs, xp, xs, o)
        return lambda: [experts_forward(p8, p16, sel[j : j + 1], offs, xp, xs, o[j : j + 1]) for j in range(n_exp)]

    def timed(n_exp: int, batched: bool) -> float:
        for _ in range(2):  # warm-up at this thread count
            run(n_exp, batched)()
        calls = [run(n_exp, batched) for _ in range(args.repeats)]
        it = iter(calls)
        return median_ms(lambda: next(it)(), args.repeats)

    rows = []
    print(f"\n{'threads':>7} {'experts':>7} {'mode':>10} {'ms':>8} {'ms/expert':>9} {'GB/s':>7} {'vs PCIe':>8}")
    grid = [(t, n, True) for t in threads for n in (1, 2, 4, 8)]
    grid += [(max_threads, n, True) for n in (3, 5, 6, 7)]  # for the split
    grid += [(max_threads, n, False) for n in (2, 4, 8)]  # one call per expert: what batching buys
    for t, n, batched in grid:
        numba.set_num_threads(t)
        ms = timed(n, batched)
        gbs = n * rb / ms / 1e6
        rows.append({"threads": t, "experts": n, "batched": batched, "ms": ms, "ms_per_expert": ms / n, "gbs": gbs})
        print(f"{t:>7} {n:>7} {'batched' if batched else 'one/call':>10} {ms:8.3f} {ms / n:9.3f} {gbs:7.1f} "
              f"{gbs / args.pcie_gbs:7.2f}x")

    # Plain PyTorch: dequantize the whole record to fp32, then two matmuls (what the CPU path does).
    torch.set_num_threads(max_threads)
    rec = torch.from_numpy(pool[0])
    xt = torch.from_numpy(x)[None]
    torch_ms = median_ms(lambda: swiglu_expert(xt, *layout.weights(rec, torch.float32)), max(3, args.repeats // 4))
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
            "numba_threads": max_threads, "check_rel_err": worst, "memory_read": bw, "rows": rows,
            "torch_ms_per_expert": torch_ms, "splits": splits, "repeats": args.repeats,
        }, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
