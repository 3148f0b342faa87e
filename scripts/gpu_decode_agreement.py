"""How far GPU decode's numerics move a trained model's next-token distributions from the CPU path's:
teacher-forced decode (one token per step, the gathered-experts kernels) over held-out text, both in
fp32 on the same packed model, so the only difference is the kernels' arithmetic (the 4-bit kernel
rounds its inputs to 16-bit fixed point per group; the CPU kernel is exact in fp32).

    python3 scripts/gpu_decode_agreement.py [MODEL_DIR] [--tokens 1024] [--window 256]

Prints KL(CPU || GPU) in nats per token, top-1 agreement and the logits' relative error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
from flashmoe.engine import Engine, EngineConfig


def decode_logits(engine: Engine, windows: list[list[int]]) -> torch.Tensor:
    """Each window's first token prefilled, the rest fed one decode step at a time -> [tokens, vocab] fp32."""
    out = []
    with torch.inference_mode():
        for ids in windows:
            state = engine.new_state()
            out.append(engine.forward(torch.tensor(ids[:1], device=engine.device), state).float().cpu())
            for t in ids[1:-1]:
                out.append(engine.forward(torch.tensor([t], device=engine.device), state).float().cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, default=DEMO_MODEL)
    ap.add_argument("--tokens", type=int, default=1024, help="decode steps in all")
    ap.add_argument("--window", type=int, default=256, help="tokens per sequence")
    args = ap.parse_args()
    cpu = Engine(args.model, EngineConfig(dtype="float32"))
    ids = cpu.tokenizer.encode(HELDOUT_TEXT.read_text())
    windows = [ids[i:i + args.window] for i in range(0, args.tokens, args.window)]
    ref = decode_logits(cpu, windows)
    got = decode_logits(Engine(args.model, EngineConfig(device="cuda", dtype="float32")), windows)
    logp_ref, logp = ref.log_softmax(-1), got.log_softmax(-1)
    kl = float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    rel = float((got - ref).norm() / ref.norm())
    print(f"{args.model.name}: {len(ref)} decode steps, KL(cpu || gpu) {kl:.2e} nats/token, "
          f"top-1 agreement {100 * top1:.2f}%, logits relative error {rel:.2e}")


if __name__ == "__main__":
    main()
