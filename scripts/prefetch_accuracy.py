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

from flashmoe.engine import Engine, EngineConfig
from flashmoe.models.context import StepContext

DEMO = Path(__file__).resolve().parents[1] / "flashmoe" / "demo_model"


class _Recording(StepContext):
    """Runs the model as usual, keeping per MoE layer the residual after its dense part (what the
    graphed step has before the routing sync), after its routed experts, and its real ids [T, k]."""

    def __init__(self, engine: Engine):
        super().__init__(engine.new_state(), engine.experts, last_only=False)
        self.seen: dict[int, dict] = {}

    def run_experts(self, layer, h, ids, weights, residual):
        out = super().run_experts(layer, h, ids, weights, residual)
        self.seen[layer] = {"dense": residual, "after": out, "ids": ids}
        return out


def layer_states(engine: Engine, ids: list[int]) -> dict[int, dict]:
    ctx = _Recording(engine)
    engine.model(torch.tensor(ids), ctx)
    return ctx.seen


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
    engine = Engine(args.model, EngineConfig(dtype="float32"))
    ids = engine.tokenizer.encode(args.text.read_text())[: args.tokens]
    layers, moe = engine.model.layers, engine.moe_layers
    k, E = engine.top_k, engine.args.moe.num_experts
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
                    pred = nxt.mlp.route(nxt.mlp.project(n(states[a][where]))[0])[1]
                    scores[name][j].append(overlap(pred, real))
                scores["a's own experts (cross-layer id correlation)"][j].append(overlap(states[a]["ids"], real))
    print(f"{args.model.name}: {len(ids)} tokens of {args.text.name}, k={k} of {E} experts (chance {k / E:.1%})")
    print("share of layer b's real experts predicted, mean over tokens; per pair (a, b) then the mean")
    for name, per_pair in scores.items():
        means = [sum(v) / len(v) for v in per_pair]
        print(f"  {sum(means) / len(means):6.1%}  " + " ".join(f"{m:.0%}" for m in means) + f"  {name}")


if __name__ == "__main__":
    main()
