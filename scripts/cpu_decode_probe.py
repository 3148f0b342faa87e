"""The CPU path's decode rate on the bundled demo model: median over 5 generations of 127 greedy
tokens (after one warm-up), as wall tok/s and CPU time per token (the latter holds up when another
process shares the machine). EXPERIMENTS entries 73-74.

Usage: python3 scripts/cpu_decode_probe.py [--dtype float32] [--threads 1] [--dense-bits 16]"""

import argparse
import statistics
import time

from flashmoe.config import EngineConfig
from flashmoe.demo import DEMO_MODEL
from flashmoe.engine import Engine
from flashmoe.runtime.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-bits", type=int, default=16)
    args = ap.parse_args()
    engine = Engine(DEMO_MODEL, EngineConfig(dtype=args.dtype, threads=args.threads, dense_bits=args.dense_bits))
    prompt = engine.tokenizer.encode("import os\ndef walk(path):")
    rates, cpu_ms = [], []
    for run in range(6):
        steps = iter(engine.generate(prompt, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)))
        next(steps)  # the prefill and the first token
        cpu0, wall0 = time.process_time(), time.perf_counter()
        n = sum(1 for _ in steps)
        if run:  # the first run warms caches and compiles
            rates.append(n / (time.perf_counter() - wall0))
            cpu_ms.append((time.process_time() - cpu0) / n * 1e3)
    print(f"{args.dtype}, threads={args.threads}, dense bits {args.dense_bits}: decode {statistics.median(rates):.1f} tok/s, "
          f"{statistics.median(cpu_ms):.2f} ms CPU per token")


if __name__ == "__main__":
    main()
