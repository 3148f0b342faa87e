"""Kernel timings on the GPU: the gathered-experts decode kernels and the int8 dense GEMV
(`--dense-bits 8`) at real shapes, as achieved bandwidth against a device-to-device copy measured in
the same run. Each decode timing is a CUDA graph of calls over different expert slots or weight
copies (so the 50 MB L2 cannot serve repeats), median of replays."""

import argparse

import torch
import triton

from flashmoe.bench.probes import hbm_copy_bandwidth
from flashmoe.bench.synthesis import random_records
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.codes import layout_xq
from flashmoe.kernels.moe_gemv import MoeGemv, moe_gemv_reference
from flashmoe.kernels.moe_grouped import MoeGrouped
from flashmoe.layers.int8_linear import Int8Linear


# The gathered-experts kernels' launch configurations, the first each default: 16-bit records
# (block_n, block_k, warps), quantized ones as MoeGemv's keyword arguments beside its defaults. At
# 4 bits, k=10: v2 61.8 us, v3 27.4 (docs/bench/2026-12-02/kernels-gemv-v3-h200.txt), v4 25.7-25.8
# against v3's 28.1-29.0 in the same runs (docs/bench/2026-12-03/); on the H100 31.4 us = 75% of its
# copy rate (docs/bench/2026-12-06/).
CONFIGS_16 = [(8, 1024, 2), (4, 1024, 1), (4, 2048, 2)]
CONFIGS = [{}, dict(down_experts=4), dict(pdl=False), dict(num_warps=1), dict(block_n=8), dict(down_block_n=8),
           dict(block_n=2), dict(num_warps=4), dict(block_n=8, down_block_n=4)]
LABELS = dict(block_n="bn", num_warps="w", down_block_n="dbn", down_experts="de", pdl="pdl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=256, help="pool size (rotated so reads miss the L2)")
    ap.add_argument("--only", choices=["gemv", "grouped", "dense8", "mxfp4"],
                    help="time one kernel family (mxfp4: gpt-oss's experts, e.g. --hidden 2880 --intermediate 2880)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 8, 16], help="gemv: record widths to time")
    ap.add_argument("--ab", nargs="+", metavar="LABEL",
                    help="interleaved A/B of these quantized configurations (labels as the sweep prints them) "
                         "against the default, at the first --bits: the call at k=10 and 4, each step alone")
    ap.add_argument("--quick", action="store_true", help="mxfp4: the first four launch configurations, no prefill")
    ap.add_argument("--rounds", type=int, default=8, help="--ab: rounds, the order reversed every other one")
    ap.add_argument("--once", action="store_true",
                    help="only three untimed calls of the default gathered-experts kernels (first --bits, k=10), "
                         "for a profiler: ncu --clock-control none -k regex:v4_kernel ...")
    args = ap.parse_args()
    if args.once:
        layout = RecordLayout.build(args.hidden, args.intermediate, args.bits[0], 64)
        pool = torch.cat([random_records(layout, 32, torch.Generator(device="cuda")) for _ in range(args.slots // 32)])
        gemv, x, w = MoeGemv(layout), torch.randn(1, args.hidden, device="cuda", dtype=torch.bfloat16), torch.ones(1, 10)
        for _ in range(3):
            gemv(x, pool, torch.randperm(args.slots, device="cuda")[:10].view(1, 10).int(), w.cuda())
        torch.cuda.synchronize()
        return
    hbm = hbm_copy_bandwidth() / 1e9
    print(f"device-to-device copy: {hbm:.0f} GB/s (read + write)")
    if args.ab:
        gemv_ab(args, hbm)
        return
    if args.only in (None, "gemv"):
        gemv_sweep(args, hbm)
    if args.only in (None, "grouped"):
        grouped_sweep(args)
    if args.only in (None, "dense8"):
        dense8(hbm)
    if args.only in (None, "mxfp4"):
        mxfp4(args, hbm)


# MoeMxfp4's decode configurations (block_n, groups a step, stages), the first its default.
MXFP4_CONFIGS = [(32, 4, 3), (32, 4, 1), (32, 2, 4), (16, 4, 3), (32, 4, 5), (64, 2, 3), (16, 8, 3), (64, 4, 2)]


def mxfp4(args, hbm: float) -> None:
    """gpt-oss's MXFP4 experts (biases, clamped SwiGLU): relative error against the reference on one
    token, us per decode call for k = 1 and 4 per launch configuration, then prefill (grouped) at
    2048 tokens x 4 experts over 128 (entry 81 of docs/EXPERIMENTS.md predicts the decode's share of copy)."""
    from flashmoe.kernels.moe_mxfp4 import MoeMxfp4, mxfp4_reference
    from flashmoe.layers.mlp import Swiglu

    act = Swiglu(1.702, 7.0)
    layout = RecordLayout.build(args.hidden, args.intermediate, 4, 32, with_bias=True, scheme="mxfp4")
    gen = torch.Generator(device="cuda").manual_seed(3)
    pool = torch.cat([random_records(layout, 32, gen) for _ in range(args.slots // 32)])
    x = torch.randn(1, args.hidden, device="cuda", dtype=torch.bfloat16)
    slots, w = torch.randperm(args.slots, device="cuda")[:4].view(1, 4).to(torch.int32), torch.full((1, 4), 0.25, device="cuda")
    ref = sum(0.25 * mxfp4_reference(layout, act, x, pool[int(s)]) for s in slots[0])
    print(f"mxfp4 experts {args.hidden} x {args.intermediate}, decode: block_n groups stages  k  us/call   GB/s  % of copy  rel.err")
    for bn, groups, stages in MXFP4_CONFIGS[:4] if args.quick else MXFP4_CONFIGS:
        kernel = MoeMxfp4(layout, act, block_n=bn, groups=groups, stages=stages)
        err = float((kernel(x, pool, slots, w) - ref).norm() / ref.norm())
        for k in (1, 4):
            wk = torch.full((1, k), 1 / k, device="cuda")
            sets = [torch.randperm(args.slots, device="cuda")[:k].view(1, k).to(torch.int32) for _ in range(16)]
            us = per_call_us(lambda: [kernel(x, pool, s, wk) for s in sets], len(sets))
            gbs = k * layout.payload_bytes / us / 1e3
            print(f"{'':>42}{bn:>7} {groups:>6} {stages:>6} {k:>2} {us:>8.1f} {gbs:>6.0f} {100 * gbs / hbm:>9.0f}%  {err:>8.1e}")
    if args.quick:
        return
    tokens, k, experts = 2048, 4, min(128, args.slots)
    counts = [tokens * k // experts] * experts
    xs = torch.randn(tokens * k, args.hidden, device="cuda")
    flops = 2 * tokens * k * 3 * args.hidden * args.intermediate
    print(f"mxfp4 prefill, {experts} experts x {counts[0]} rows: block_m block_n warps stages    ms  TFLOP/s")
    for bm, bn, warps, stages in ((64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)):
        kernel = MoeMxfp4(layout, act, prefill_block_n=bn, block_m=bm, num_warps=warps, stages=stages)
        ms = triton.testing.do_bench(lambda: kernel.grouped(xs, pool, list(range(experts)), counts), return_mode="median")
        print(f"{'':>44}{bm:>7} {bn:>7} {warps:>5} {stages:>6} {ms:>6.2f} {flops / ms / 1e9:>8.0f}")


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


def gemv_configs(layout: RecordLayout):
    """(kernel family, config label, MoeGemv's arguments) of the sweep for one layout."""
    if layout.bits == 16:
        for bn, bk, warps in CONFIGS_16:
            yield "16-bit", f"bn{bn} bk{bk} w{warps}", dict(block_n=bn, block_k=bk, num_warps=warps)
        return
    for config in CONFIGS:
        yield "v4", ",".join(f"{LABELS[k]}{int(v)}" for k, v in config.items()) or "default", config


def gemv_sweep(args, hbm: float) -> None:
    """Each configuration: relative error against moe_gemv_reference on the GPU (2 tokens,
    10 experts), then us per call for k = 1 and 10 (one token), and for quantized records at k = 10
    each matvec kernel alone from inputs laid out beforehand (gate_up_step, down_step: the bytes
    of its projection); then where the default spends its time, kernel by kernel (profiler, eager
    calls)."""
    print(" kernel bits  k  config            us/call   GB/s  % of copy   rel.err")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for bits in args.bits:
        layout = RecordLayout.build(args.hidden, args.intermediate, bits, 64)
        pool = torch.cat([random_records(layout, 32, gen) for _ in range(args.slots // 32)])
        x = torch.randn(1, args.hidden, device="cuda", dtype=torch.bfloat16)
        x2 = torch.randn(2, args.hidden, device="cuda", dtype=torch.bfloat16)
        slots2 = torch.stack([torch.randperm(args.slots, device="cuda")[:10] for _ in range(2)]).to(torch.int32)
        w2 = torch.softmax(torch.randn(2, 10, device="cuda"), -1)
        ref = moe_gemv_reference(layout, x2, pool, slots2, w2)
        defaults = {}
        for family, label, config in gemv_configs(layout):
            try:  # one failing configuration (say, a launch mode the driver refuses in a graph) skips only itself
                gemv = MoeGemv(layout, **config)
                err = float((gemv(x2, pool, slots2, w2) - ref).norm() / ref.norm())
                for k in (1, 10):
                    w = torch.softmax(torch.randn(1, k, device="cuda"), -1)
                    sets = [torch.randperm(args.slots, device="cuda")[:k].view(1, k).to(torch.int32) for _ in range(16)]
                    us = per_call_us(lambda: [gemv(x, pool, s, w) for s in sets], len(sets))
                    gbs = k * layout.payload_bytes / us / 1e3
                    print(f"{family:>7} {bits:>4} {k:>2}  {label:<16} {us:>8.1f} {gbs:>6.0f} {100 * gbs / hbm:>9.0f}%  {err:>9.1e}")
                if gemv.quantized:
                    for step, (us, nbytes) in steps_alone(gemv, x, pool, sets, w).items():
                        gbs = nbytes / us / 1e3
                        print(f"{family:>7} {bits:>4} {k:>2}  {label:<16} {us:>8.1f} {gbs:>6.0f} {100 * gbs / hbm:>9.0f}%"
                              f"            {step} alone")
                defaults.setdefault(family, gemv)
            except Exception as e:
                print(f"{family:>7} {bits:>4}     {label:<16} failed: {type(e).__name__}: {e}"[:300])
        for family, gemv in defaults.items():
            sets = [torch.randperm(args.slots, device="cuda")[:10].view(1, 10).to(torch.int32) for _ in range(16)]
            w = torch.softmax(torch.randn(1, 10, device="cuda"), -1)
            times = kernel_times(lambda: [gemv(x, pool, s, w) for s in sets], len(sets))
            print(f"  {family} {bits}-bit k=10 default, us per call by kernel: "
                  + ", ".join(f"{name} {t:.1f}" for name, t in times.items()))


def gemv_ab(args, hbm: float) -> None:
    """Differences of a few tenths of a microsecond outlast one sweep's noise only when measured
    side by side: each round times every configuration once, in alternating order."""
    layout = RecordLayout.build(args.hidden, args.intermediate, args.bits[0], 64)
    gen = torch.Generator(device="cuda").manual_seed(2)
    pool = torch.cat([random_records(layout, 32, gen) for _ in range(args.slots // 32)])
    configs = {label: config for _, label, config in gemv_configs(layout) if label == "default" or label in args.ab}
    if missing := set(args.ab) - set(configs):
        raise SystemExit(f"no configuration labelled {', '.join(sorted(missing))}; the sweep's labels: "
                         + ", ".join(label for _, label, _ in gemv_configs(layout)))
    gemvs = {label: MoeGemv(layout, **config) for label, config in configs.items()}
    x = torch.randn(1, args.hidden, device="cuda", dtype=torch.bfloat16)
    times: dict[tuple[str, str], list[float]] = {}
    nbytes: dict[str, int] = {}
    for k in (10, 4):
        sets = [torch.randperm(args.slots, device="cuda")[:k].view(1, k).to(torch.int32) for _ in range(16)]
        w = torch.softmax(torch.randn(1, k, device="cuda"), -1)
        nbytes[f"call k={k}"] = k * layout.payload_bytes
        for rnd in range(args.rounds):
            for label in list(gemvs)[:: 1 if rnd % 2 == 0 else -1]:
                gemv = gemvs[label]
                times.setdefault((label, f"call k={k}"), []).append(
                    per_call_us(lambda: [gemv(x, pool, s, w) for s in sets], len(sets)))
                if k == 10:
                    for step, (us, n) in steps_alone(gemv, x, pool, sets, w).items():
                        times.setdefault((label, f"{step} alone"), []).append(us)
                        nbytes[f"{step} alone"] = n
    print(f"A/B, {layout.bits}-bit, {args.rounds} interleaved rounds: what  config  median us (range)  % of copy")
    for what in nbytes:
        for label in gemvs:
            t = sorted(times[label, what])
            med = t[len(t) // 2]
            print(f"  {what:<14} {label:<12} {med:>7.2f} ({t[0]:.2f}-{t[-1]:.2f})  {100 * nbytes[what] / med / 1e3 / hbm:>5.1f}%")


def steps_alone(gemv: MoeGemv, x, pool, sets, w) -> dict[str, tuple[float, int]]:
    """us per call and payload bytes of gate_up_step and down_step, each alone from inputs laid out
    beforehand (a different h for each set of experts)."""
    L, k = gemv.layout, sets[0].shape[1]
    seg = {s.name: s for s in L.segments}
    down_bytes = k * sum(seg[f"down_proj.{p}"].nbytes for p in ("weight", "scales", "biases"))
    xq = layout_xq(x, L.bits, gemv.group, False)
    hq = [layout_xq(torch.randn(k, L.intermediate_size, device="cuda"), L.bits, gemv.group, False) for _ in sets]
    y = torch.empty(1, L.hidden_size, device="cuda")
    return {
        "gate_up": (per_call_us(lambda: [gemv.gate_up_step(xq, pool, s, w) for s in sets], len(sets)),
                    k * L.payload_bytes - down_bytes),
        "down": (per_call_us(lambda: [gemv.down_step(h, pool, s, None, y) for s, h in zip(sets, hq)], len(sets)),
                 down_bytes),
    }


def kernel_times(calls, n: int, repeats: int = 5) -> dict[str, float]:
    """Device time per call of each kernel `calls` launches (n calls per invocation)."""
    from torch.profiler import ProfilerActivity, profile

    calls()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            calls()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total and "kernel" in e.key:
            out[e.key] = total / (repeats * n)
    return out


# (N, K) of the 397B's dense projections: shared expert gate/up and down, in_proj_qkv, o_proj / out_proj,
# q_proj, lm_head. The int8 GEMV's configurations: (block_n, warps); the first is the default. The
# first version (int-to-float conversions) measured 14-72% of the copy on these shapes, against
# bf16 F.linear's 29-102%: docs/bench/2026-11-23/kernels-dense8-h200.txt.
DENSE_SHAPES = [(1024, 4096), (4096, 1024), (12288, 4096), (4096, 8192), (16384, 4096), (248320, 4096)]
DENSE8_CONFIGS = [(8, 2), (2, 4), (4, 4), (8, 4), (4, 8), (8, 8), (2, 2), (16, 4)]


def dense8(hbm: float) -> None:
    """int8 GEMV (one token) against bf16 torch.nn.functional.linear, then prefill (2048 rows: codes
    converted for the library matmul) against bf16."""
    from flashmoe.kernels.int8_gemv import int8_gemv

    print("dense int8 GEMV vs bf16 F.linear, weight bytes read per call: N K block_n warps"
          "  int8 us  GB/s  % of copy | bf16 us  GB/s  % of copy | speedup")
    for N, K in DENSE_SHAPES:
        copies = max(1, min(32, (512 << 20) // (N * K)))  # >= 512 MiB of int8 weights per replay: no L2 reuse
        q = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda") for _ in range(copies)]
        scale = torch.rand(N, device="cuda") / 127
        w16 = [c.to(torch.bfloat16) for c in q]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        us16 = per_call_us(lambda: [torch.nn.functional.linear(x, w) for w in w16], copies)
        for block_n, warps in DENSE8_CONFIGS:
            us8 = per_call_us(lambda: [int8_gemv(x, c, scale, block_n, warps) for c in q], copies)
            gb8, gb16 = N * K / us8 / 1e3, 2 * N * K / us16 / 1e3
            print(f"{N:>6} {K:>5} {block_n:>7} {warps:>5}  {us8:>7.1f} {gb8:>5.0f} {100 * gb8 / hbm:>9.0f}%"
                  f" | {us16:>7.1f} {gb16:>5.0f} {100 * gb16 / hbm:>9.0f}% | {us16 / us8:>5.2f}x")
        del q, w16
    print("prefill, 2048 rows: N K  int8 (converted + cuBLAS) ms  bf16 ms  int8 / bf16")
    for N, K in DENSE_SHAPES[:-1]:
        layer = Int8Linear(K, N).cuda()
        layer.weight.copy_(torch.randint(-127, 128, (N, K), dtype=torch.int8))
        layer.scale.copy_(torch.rand(N) / 127)
        w = layer.weight.to(torch.bfloat16)
        x = torch.randn(2048, K, device="cuda", dtype=torch.bfloat16)
        ms8 = triton.testing.do_bench(lambda: layer(x), return_mode="median")
        ms16 = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
        print(f"{N:>6} {K:>5} {ms8:>10.3f} {ms16:>8.3f} {ms8 / ms16:>8.2f}")


def per_call_us(calls, n: int) -> float:
    return triton.testing.do_bench_cudagraph(calls, return_mode="median") * 1e3 / n


if __name__ == "__main__":
    main()
