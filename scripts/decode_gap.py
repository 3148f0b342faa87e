"""Where a resident decode step's time goes outside the GPU's work: the same whole-step CUDA graph
timed three ways on a bench slice, placed as `flashmoe bench --preload` places it.

  generate   Engine.generate, steady state (what bench's S1 rows time)
  loop       the graph replayed, the token read back (argmax), and nothing else
  + read     loop with a blocking read of the expert counters after each step (what generate did
             before it queued that copy, commit 3d55dd1)
  queued     the graph replayed back to back on the loop's tokens, one sync at the end: the GPU's time

generate - loop is the generation loop's own cost; loop - queued the per-token round trip (the
token's read, the next launch). Both are paid once per token, whatever the layer count.

Usage: python3 scripts/decode_gap.py [--layers 8] [--k 4 10] [--cpu-experts 0 2] [--tokens 64]"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from flashmoe.bench.presets import preset_config
from flashmoe.bench.scenarios import steady_seconds_per_token
from flashmoe.bench.synthesis import synthesize
from flashmoe.bench.tiers import place_tiers, plan_tiers, slice_engine
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.cpu_expert_server import ExpertServer
from flashmoe.runtime.graphs import DecodeGraph
from flashmoe.analysis.locality import WINDOWS, reuse_profile
from flashmoe.analysis.routing_trace import record
from flashmoe.runtime.sampling import SamplingParams
from flashmoe.utils import total_memory_bytes


def per_token(run, tokens: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(tokens)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / tokens)
    return statistics.median(times)


def measure(engine, args, k: int, cpu: int) -> None:
    prompt = list(range(1000, 1016))
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    decoded = [step.token for step in engine.generate(prompt, params)]
    reuse = reuse_profile(record(engine, prompt + decoded).ids[len(prompt):]).mean(0)
    print(f"greedy decode: {len(set(decoded))} distinct of {len(decoded)} tokens; experts reused from the previous "
          + ", ".join(f"{w}: {r:.1%}" for w, r in zip(WINDOWS, reuse)) + f" tokens (uniform: {k}/{engine.args.moe.num_experts} per token)")
    generate = statistics.median(steady_seconds_per_token(engine, prompt, params)[0] for _ in range(5))

    state = engine.new_state()
    logits = engine.forward(prompt, state)
    token = int(logits[-1].argmax())
    graphs = DecodeGraph(engine, [state], state.position + 12 * args.tokens)

    fed: list[int] = []  # what loop mode decoded: queued mode feeds the same tokens, so routes alike

    def loop(n: int) -> None:
        nonlocal token
        for _ in range(n):
            fed.append(token)
            token = int(graphs.step([token])[-1].argmax())

    def loop_collecting(n: int) -> None:
        nonlocal token
        for _ in range(n):
            logits = graphs.step([token])
            engine.gpu_tier.resident.collect()
            token = int(logits[-1].argmax())

    def loop_timed(n: int) -> tuple[float, float]:
        """(GPU time of the graph, host time of its launch) per token, in loop mode."""
        nonlocal token
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        launch = 0.0
        for start, end in events:
            start.record()
            t0 = time.perf_counter()
            logits = graphs.step([token])
            launch += time.perf_counter() - t0
            end.record()
            token = int(logits[-1].argmax())
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3, launch / n

    def queued(n: int) -> None:
        for i in range(n):
            graphs.step([fed[i % len(fed)]])

    loop(2)
    t_loop, t_collect, t_queued = (per_token(f, args.tokens // 4) for f in (loop, loop_collecting, queued))
    t_graph, t_launch = loop_timed(args.tokens)
    del graphs  # its memory pool goes back before the next measurement
    print(f"{args.preset} L{args.layers} {args.bits}-bit k={k} cpu-experts {cpu}, ms/token:")
    print(f"  generate {generate * 1e3:.3f} | loop + read {t_collect * 1e3:.3f} | loop {t_loop * 1e3:.3f} | queued {t_queued * 1e3:.3f}")
    print(f"  generation loop {(generate - t_loop) * 1e3:.3f}, blocking counter read {(t_collect - t_loop) * 1e3:.3f}, "
          f"token round trip {(t_loop - t_queued) * 1e3:.3f}; in loop mode the graph takes {t_graph * 1e3:.3f} "
          f"on the GPU (median) and {t_launch * 1e3:.3f} to launch")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument("--cpu-experts", type=int, nargs="+", default=[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="CPU expert server threads (default: all cores but one)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flashmoe-bench"))
    args = ap.parse_args()
    if args.threads:
        ExpertServer.__init__.__defaults__ = (args.threads,)
    full, cfg = preset_config(args.preset), preset_config(args.preset, args.layers)
    out = synthesize(args.workdir / f"{args.preset}-L{args.layers}-{args.bits}bit", cfg, args.bits, device="cuda")
    layout = RecordLayout.build(cfg["hidden_size"], cfg["moe_intermediate_size"], args.bits, 64)
    tiers = plan_tiers(full, layout, torch.cuda.get_device_properties(0).total_memory, total_memory_bytes(), dense_bits=8)
    engine = slice_engine(out, cfg, layout, tiers, max(args.k), dense_bits=8)
    place_tiers(engine, tiers, resident=True)
    for k in args.k:
        for cpu in args.cpu_experts:
            engine.set_top_k(k)
            engine.set_cpu_experts(cpu)
            measure(engine, args, k, cpu)
    engine.close()


if __name__ == "__main__":
    main()
