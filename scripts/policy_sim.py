"""Hit rates of the cache policies (runtime/policy.py's SlotMap, the code the tiers run) on routing
streams: synthetic ones (uniform, as a random model routes; Zipf-skewed expert popularity; skew plus
temporal locality, a share of each token's experts repeating the previous token's) or, with
--trace, a recorded trace at its own shape and its locality replayed (runtime/locality.py) at its
own shape and at the --layers/--experts/--k shape.
With --placement, resident decode's placement instead (runtime/policy.py AdaptivePlacement, the code
the GPU tier runs): a static first placement against the adaptive one, by GPU hit rate per 500
tokens and swaps, under uniform routing and under the trace's replay with each layer's ids shuffled
(so the first placement is blind to popularity), at --gpu-share of each layer on the GPU.
Usage: python scripts/policy_sim.py [--layers 8] [--tokens 400] [--trace trace.npz] [--placement]"""

import argparse

import numpy as np
import torch

from flashmoe.analysis.locality import fit_replay, hit_rate, reuse_profile
from flashmoe.experts.policy import POLICIES, AdaptivePlacement
from flashmoe.analysis.routing_trace import RoutingTrace

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


def placement(name: str, ids: np.ndarray, experts: int, gpu_share: float) -> None:
    """GPU hit rates of a static placement and of AdaptivePlacement over a stream [T, L, k], the
    adaptive one swapping as the tier does between decode steps."""
    T, L, k = ids.shape
    layer = np.arange(L)[:, None]
    first = np.zeros((L, experts), dtype=bool)
    first[:, : int(gpu_share * experts)] = True
    adaptive = AdaptivePlacement(first.copy())  # it updates the mask it is given
    hits = {"static": [], "adaptive": []}
    swaps = 0
    for t in range(T):
        hits["static"].append(first[layer, ids[t]].mean())
        hits["adaptive"].append(adaptive.on_gpu[layer, ids[t]].mean())
        uses = np.zeros((L, experts))
        np.add.at(uses, (np.repeat(np.arange(L), k), ids[t].ravel()), 1)
        adaptive.observe(uses)
        swaps += len(adaptive.swaps())
    for kind, rates in hits.items():
        windows = " ".join(f"{np.mean(rates[i : i + 500]):.1%}" for i in range(0, T, 500))
        print(f"{name:<28} {kind:<9} GPU hits per 500 tokens: {windows}" + (f"  swaps {swaps / T:.2f}/token" * (kind == "adaptive")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--trace", help="a routing trace from flashmoe trace")
    ap.add_argument("--placement", action="store_true", help="resident placement, static against adaptive (needs --trace)")
    ap.add_argument("--gpu-share", type=float, default=312 / 512, help="--placement: share of each layer on the GPU")
    args = ap.parse_args()
    if args.placement:
        if not args.trace:
            ap.error("--placement replays a trace: give --trace")
        trace = RoutingTrace.load(args.trace)
        rng = np.random.default_rng(1)
        uniform = np.stack([[rng.choice(args.experts, args.k, replace=False) for _ in range(args.layers)]
                            for _ in range(args.tokens)])
        placement("uniform", uniform, args.experts, args.gpu_share)
        replay = fit_replay(trace.ids, trace.num_experts, args.experts, args.k).generate(args.tokens, args.layers)
        perm = np.stack([rng.permutation(args.experts) for _ in range(args.layers)])  # popularity unknown to the placement
        placement("replay, ids shuffled", perm[np.arange(args.layers)[None, :, None], replay], args.experts, args.gpu_share)
        return
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
