"""Hit rates of the cache policies (runtime/policy.py's SlotMap, the code the tiers run) on
synthetic routing traces: uniform (a random model), Zipf-skewed expert popularity, and skew plus
temporal locality (a share of each token's experts repeats the previous token's).
Usage: python scripts/policy_sim.py [--layers 8] [--tokens 400]"""

import argparse

import torch

from flashmoe.runtime.policy import POLICIES, SlotMap


def trace(kind: str, layers: int, experts: int, k: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float64)
    popularity = ranks**-1.0 if kind != "uniform" else torch.ones(experts, dtype=torch.float64)
    perms = [torch.randperm(experts, generator=g) for _ in range(layers)]  # which expert is popular, per layer
    previous = [None] * layers
    for _ in range(tokens):
        for layer in range(layers):
            chosen = perms[layer][torch.multinomial(popularity, k, generator=g)].tolist()
            if kind == "skew+locality" and previous[layer] is not None:
                keep = [e for e in previous[layer] if float(torch.rand((), generator=g)) < 0.5]
                chosen = list(dict.fromkeys(keep + chosen))[:k]
            previous[layer] = chosen
            yield layer, chosen


def hit_rate(policy: str, capacity: int, events) -> float:
    slots = SlotMap(range(capacity), policy)
    hits = total = 0
    for layer, chosen in events:
        slots.policy.tick()
        for e in chosen:
            key = (layer, e)
            slots.policy.touch(key)
            total += 1
            if key in slots:
                hits += 1
            else:
                slots.admit(key, set())
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=400)
    args = ap.parse_args()
    print(f"{args.layers} layers x {args.experts} experts, k={args.k}, {args.tokens} tokens")
    print("trace           capacity  " + "  ".join(f"{p:>6}" for p in POLICIES))
    for kind in ("uniform", "skew", "skew+locality"):
        events = list(trace(kind, args.layers, args.experts, args.k, args.tokens))
        for share in (0.125, 0.25, 0.5):
            capacity = int(share * args.layers * args.experts)
            rates = [hit_rate(p, capacity, events) for p in POLICIES]
            print(f"{kind:<15} {share:>8.1%}  " + "  ".join(f"{r:>6.1%}" for r in rates))


if __name__ == "__main__":
    main()
