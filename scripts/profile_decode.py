"""Where a decode step's GPU time goes, kernel by kernel (torch.profiler), on a packed model: per
token and per layer. Usage: python3 scripts/profile_decode.py MODEL_DIR [--graphs] [--preload]
[--dense-bits 8] [--top-k K]. On a bench slice (/tmp/flashmoe-bench/...) with --preload, every
expert is in a GPU or pinned host slot, placed as `flashmoe bench` places them."""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from flashmoe.models import read_args
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest
from flashmoe.runtime.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--preload", action="store_true")
    ap.add_argument("--dense-bits", type=int, default=16)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--gpu-share", type=float, default=0.61, help="with --preload: share of each layer's experts on the GPU")
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    cfg, record = read_args(args.model), Manifest.load(args.model).layout.record_size
    experts = len(cfg.moe_layers) * cfg.moe.num_experts
    gpu_slots = int(experts * args.gpu_share) if args.preload else min(experts, (24 << 30) // record)
    engine = Engine(args.model, EngineConfig(device="cuda", verify=False, cuda_graphs=args.graphs, dense_bits=args.dense_bits, k=args.top_k, gpu_mem=gpu_slots * record, host_mem=(experts - gpu_slots + 64) * record if args.preload else 16 << 30, cache_policy="static" if args.preload else "mix", preload=args.preload))
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    list(engine.generate([100], params))  # warm: kernels compiled, graphs captured (a 1-token prompt: all steps decode)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen = engine.generate([100], params)
        list(gen)
        torch.cuda.synchronize()
    n, layers = gen.stats.decode_tokens, cfg.num_hidden_layers
    print(f"decode {n} tokens, {gen.stats.decode_tps:.2f} tok/s (graphs={args.graphs}, preload={args.preload}, "
          f"dense {args.dense_bits}-bit, k={engine.top_k}, {layers} layers); GPU kernels:")
    rows = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows)
    print(" us/token  us/layer  calls/layer  us/call  kernel")
    for e in rows[:40]:
        t = e.device_time_total / n
        print(f"{t:9.1f} {t / layers:9.2f} {e.count / n / layers:12.2f} {e.device_time_total / e.count:8.2f}  {e.key[:110]}")
    print(f"total GPU kernel time per token {total / n / 1e3:.3f} ms, per layer {total / n / layers:.1f} us")


if __name__ == "__main__":
    main()
