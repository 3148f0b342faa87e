"""Where a decode step's GPU time goes, kernel by kernel (torch.profiler), on a packed model.
Usage: python3 scripts/profile_decode.py MODEL_DIR [--graphs]"""

import argparse

from torch.profiler import ProfilerActivity, profile

from flashmoe.engine import Engine
from flashmoe.runtime.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    engine = Engine(args.model, device="cuda", host_mem=16 << 30, gpu_mem=24 << 30, verify=False, cuda_graphs=args.graphs)
    params = SamplingParams(max_tokens=args.tokens, temperature=0)
    list(engine.generate([100], params))  # warm: kernels compiled, experts cached (a 1-token prompt: all steps decode)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen = engine.generate([100], params)
        list(gen)
    n = gen.stats.decode_tokens
    print(f"decode {n} tokens, {gen.stats.decode_tps:.2f} tok/s (graphs={args.graphs}); GPU kernels, per token:")
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    for e in rows[:30]:
        print(f"{e.device_time_total / n / 1e3:8.3f} ms  {e.count / n:7.1f} calls  {e.key[:100]}")
    print(f"total GPU time per token {total / n / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
