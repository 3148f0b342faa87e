"""Hit rates of the cache policies (runtime/policy.py's SlotMap, the code the tiers run) on routing
streams: synthetic ones (uniform, as a random model routes; Zipf-skewed expert popularity; skew plus
temporal locality, a share of each token's experts repeating the previous token's) or, with
--trace, a recorded trace at its own shape and its locality replayed (runtime/locality.py) at its
own shape and at the --layers/--experts/--k shape.
Usage: python scripts/policy_sim.py [--layers 8] [--tokens 400] [--trace trace.npz]"""

import argparse

import numpy as np
import torch

from flashmoe.runtime.locality import fit_replay, hit_rate, reuse_profile
from flashmoe.runtime.policy import POLICIES
from flashmoe.runtime.routing_trace import RoutingTrace

SHARES = (0.125, 0.25, 0.5)  # tier capacity as a share of all experts


def synthetic(kind: str, layers: int, experts: int, k: int, tokens: int, seed: int = 0) -> np.ndarray:
    """[tokens, layers, k] expert ids."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    popularity = ranks**-1.0 if kind != "uniform" else torch.ones(experts, dtype=torch.float64)
    perms = [torch.randperm(experts, generator=g) for _ in range(layers)]  # which expert is popular, per layer
    out = np.empty((tokens, layers, k), dtype=np.int16)
    for t in range(tokens):
        for layer in range(layers):
            chosen = perms[layer][torch.multinomial(popularity, k, generator=g)].tolist()
            if kind == "skew+locality" and t:
                keep = [e for e in out[t - 1, layer].tolist() if float(torch.rand((), generator=g)) < 0.5]
                chosen = list(dict.fromkeys(keep + chosen))[:k]
            out[t, layer] = chosen
    return out


def report(name: str, ids: np.ndarray, experts: int) -> None:
    reuse = ", ".join(f"{u:.0%}" for u in reuse_profile(ids).mean(0))
    for share in SHARES:
        capacity = int(share * ids.shape[1] * experts)
        rates = [hit_rate(p, capacity, ids) for p in POLICIES]
        print(f"{name:<28} {share:>8.1%}  " + "  ".join(f"{r:>6.1%}" for r in rates) + f"   reuse w=1,4,16: {reuse}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--trace", help="a routing trace from flashmoe trace")
    args = ap.parse_args()
    print("stream                       capacity  " + "  ".join(f"{p:>6}" for p in POLICIES))
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        shape = f"{trace.layers}x{trace.num_experts} k={trace.k}"
        real = trace.ids[: args.tokens]
        report(f"trace {shape}", real, trace.num_experts)
        same = fit_replay(real, trace.num_experts, trace.num_experts, trace.k).generate(len(real))
        report(f"replayed {shape}", same, trace.num_experts)
        big = fit_replay(real, trace.num_experts, args.experts, args.k).generate(args.tokens, args.layers)
        report(f"replayed {args.layers}x{args.experts} k={args.k}", big, args.experts)
        return
    print(f"{args.layers} layers x {args.experts} experts, k={args.k}, {args.tokens} tokens")
    for kind in ("uniform", "skew", "skew+locality"):
        report(kind, synthetic(kind, args.layers, args.experts, args.k, args.tokens), args.experts)


if __name__ == "__main__":
    main()
