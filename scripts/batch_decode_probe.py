"""Aggregate decode throughput of Engine.forward_batch against one sequence at a time (issue:
continuous batching; docs/EXPERIMENTS.md entry 67): the bundled demo model on the CPU by default, any
packed model on any device with --model/--device.

B sequences (prompts of the held-out text, 32 tokens each) are prefilled, then decoded greedily in
steps of one token each, every sequence in one forward_batch call; B = 1 runs through the same
call; rounds alternate the batch sizes. Prints tokens per second summed over the sequences (median
of the rounds, and its ratio to the first batch size) and the expert records read per step. On the
GPU forward_batch replays the graph of the batch's bucket of state slots (as the server's; recorded
at the first step, timed apart); --graphed also times a lone Engine.generate (greedy, the same
steps), the rate a batch must beat.

Usage: python3 scripts/batch_decode_probe.py [--batch 1 2 4 8] [--steps 48] [--threads 2] [--host-mem 4M]
       python3 scripts/batch_decode_probe.py --model DIR --device cuda --preload --batch 1 4 16 --graphed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import flashmoe from the repo root

from flashmoe.config import EngineConfig
from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
from flashmoe.engine import Engine
from flashmoe.runtime.sampling import SamplingParams
from flashmoe.utils import parse_size


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--host-mem", default="4M", help="expert cache (the demo's default: smaller than its experts)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-mem", help="GPU expert slots (default: what is free)")
    ap.add_argument("--preload", action="store_true", help="GPU: every expert in GPU or host memory from the start")
    ap.add_argument("--graphed", action="store_true", help="also time one sequence through Engine.generate")
    ap.add_argument("--eager", action="store_true", help="GPU: no CUDA graphs")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the rounds, profile this many steps of the largest batch (torch.profiler: the "
                         "kernels by device time, graph replays included)")
    a = ap.parse_args()
    config = EngineConfig(device=a.device, threads=a.threads, host_mem=parse_size(a.host_mem), preload=a.preload or None,
                          cuda_graphs=not a.eager, gpu_mem=parse_size(a.gpu_mem) if a.gpu_mem else None,
                          decode_slots=max(a.batch))  # as the server pools them (--parallel)
    engine = Engine(a.model, config)
    text = engine.tokenizer.encode(HELDOUT_TEXT.read_text()[:20000])
    rates, reads, firsts = {b: [] for b in a.batch}, {b: [] for b in a.batch}, {b: [] for b in a.batch}
    graphed: list[float] = []
    for r in range(a.repeats):  # rounds over the batch sizes: a noisy machine slows them alike
        if a.graphed:
            stamps = [time.perf_counter() for _ in engine.generate(text[r * 40 : r * 40 + 32],
                                                                     SamplingParams(max_tokens=a.steps + 1, ignore_eos=True))]
            graphed.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        for batch in a.batch:
            prompts = [text[(r * 8 + i) * 40 : (r * 8 + i) * 40 + 32] for i in range(batch)]
            states = [engine.new_state() for _ in prompts]
            logits = engine.forward_batch(prompts, states)
            sync(engine)
            first = time.perf_counter()
            logits = engine.forward_batch([[t] for t in logits.argmax(-1).tolist()], states)  # apart: records a graph
            sync(engine)
            firsts[batch].append(time.perf_counter() - first)
            before = engine.store.stats.hits + engine.store.stats.misses
            start = time.perf_counter()
            for _ in range(a.steps):
                logits = engine.forward_batch([[t] for t in logits.argmax(-1).tolist()], states)
            sync(engine)
            rates[batch].append(batch * a.steps / (time.perf_counter() - start))
            reads[batch].append((engine.store.stats.hits + engine.store.stats.misses - before) / a.steps)
            del states  # their pool slots free again: the next batch takes slots 0.. (its own bucket)
    one = statistics.median(rates[a.batch[0]])
    if graphed:
        print(f"one sequence, graphed generate: {statistics.median(graphed):7.1f} tok/s "
              f"(runs {', '.join(f'{x:.1f}' for x in graphed)})")
    for batch in a.batch:
        median = statistics.median(rates[batch])
        print(f"batch {batch:>2}: {median:7.1f} tok/s aggregate, {median / one:.2f}x batch {a.batch[0]} "
              f"(runs {', '.join(f'{x:.1f}' for x in rates[batch])}); {statistics.median(reads[batch]):.0f} expert records per step; "
              f"first step {statistics.median(firsts[batch]) * 1e3:.0f} ms")
    if a.profile:
        profile(engine, text, max(a.batch), a.profile)


def profile(engine: Engine, text: list[int], batch: int, steps: int) -> None:
    """The kernels of `steps` decode steps of `batch` sequences, by total device time, and the
    device time a step adds up to (against its wall time: the gap is launches and host work)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    states = [engine.new_state() for _ in range(batch)]
    logits = engine.forward_batch([text[i * 40 : i * 40 + 32] for i in range(batch)], states)
    for _ in range(2):  # the bucket's graph recorded, caches warm
        logits = engine.forward_batch([[t] for t in logits.argmax(-1).tolist()], states)
    sync(engine)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            logits = engine.forward_batch([[t] for t in logits.argmax(-1).tolist()], states)
        sync(engine)
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    key = "self_device_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    device = sum(getattr(e, key) for e in events if e.device_type.name != "CPU" or key == "self_cpu_time_total")
    print(f"profile, batch {batch}: {wall * 1e3:.2f} ms a step wall, {device / steps / 1e3:.2f} ms of kernels a step")
    print(events.table(sort_by=key, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
