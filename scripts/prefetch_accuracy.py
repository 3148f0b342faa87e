"""How well does the next MoE layer's router, applied early, predict that layer's experts?

Runs a packed model on the CPU over real text (teacher-forced, windows from fresh states) and
scores predictors of layer b's top-k made while layer a (the MoE layer before b) is computed: the
share of b's real experts that the prediction named. Default: the demo model and its held-out text.

    python scripts/prefetch_accuracy.py [--model DIR] [--text FILE] [--tokens 4096]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flashmoe.engine import Engine
from flashmoe.layers.moe import SparseMoE
from flashmoe.models.qwen3_5_moe import NullTimer

DEMO = Path(__file__).resolve().parents[1] / "flashmoe" / "demo_model"


def layer_states(engine: Engine, ids: list[int]) -> list[dict]:
    """Per layer: the residual after its dense part (what the graphed step has before the routing
    sync), after its routed experts, and its real expert ids [T, k]."""
    model, state, timer = engine.model, engine.new_state(), NullTimer()
    positions = torch.arange(len(ids))
    cos, sin = model.rotary(positions)
    x = model.model.embed_tokens(torch.tensor(ids))
    out = []
    for layer, cache in zip(model.layers, state.layers):
        dense, h, weights, real = layer.dense(x, cos, sin, cache, timer)
        x = dense if real is None else dense + layer.mlp.experts(h, real, weights)
        out.append({"dense": dense, "after": x, "ids": real})
    return out


def overlap(pred: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over tokens of |pred & real| / k."""
    return float((pred[:, :, None] == real[:, None, :]).any(1).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO)
    p.add_argument("--text", type=Path, default=DEMO / "heldout.txt")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args()
    engine = Engine(args.model, dtype=torch.float32)
    ids = engine.tokenizer.encode(args.text.read_text())[: args.tokens]
    layers = engine.model.layers
    moe = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoE)]
    k, E = engine.top_k, engine.config.num_experts
    variants = {
        "b's router on b.post_attention_layernorm(x after a's dense part)  [flashmoe --prefetch]": ("dense", "post"),
        "b's router on b.post_attention_layernorm(x after a's experts)": ("after", "post"),
        "b's router on b.input_layernorm(x after a's dense part)": ("dense", "input"),
    }
    scores = {name: [[] for _ in moe[1:]] for name in [*variants, "a's own experts (cross-layer id correlation)"]}
    with torch.inference_mode():
        for start in range(0, len(ids), args.window):
            states = layer_states(engine, ids[start : start + args.window])
            for j, (a, b) in enumerate(zip(moe, moe[1:])):
                real, nxt = states[b]["ids"], layers[b]
                for name, (where, norm) in variants.items():
                    n = nxt.post_attention_layernorm if norm == "post" else nxt.input_layernorm
                    pred = torch.topk(nxt.mlp.gate(n(states[a][where])), k, dim=-1).indices
                    scores[name][j].append(overlap(pred, real))
                scores["a's own experts (cross-layer id correlation)"][j].append(overlap(states[a]["ids"], real))
    print(f"{args.model.name}: {len(ids)} tokens of {args.text.name}, k={k} of {E} experts (chance {k / E:.1%})")
    print("share of layer b's real experts predicted, mean over tokens; per pair (a, b) then the mean")
    for name, per_pair in scores.items():
        means = [sum(v) / len(v) for v in per_pair]
        print(f"  {sum(means) / len(means):6.1%}  " + " ".join(f"{m:.0%}" for m in means) + f"  {name}")


if __name__ == "__main__":
    main()
