"""The demo model's CPU prefill, flashmoe against transformers on the same weights (the packed demo
exported by scripts/export_hf.py), one process, rounds alternating, threads fixed: a 512-token
prompt (the held-out text's first tokens) from an empty state/cache; median of the rounds after a
warm-up, wall and CPU time (process_time: robust to other load on a shared machine). Also checks
that the last position's logits agree.

Usage: python3 prefill_vs_transformers.py --hf /tmp/demo-hf [--threads 1] [--rounds 5]"""
import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from flashmoe.config import EngineConfig
from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
from flashmoe.engine import Engine

ap = argparse.ArgumentParser()
ap.add_argument("--hf", required=True)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--rounds", type=int, default=5)
a = ap.parse_args()
torch.set_num_threads(a.threads)
engine = Engine(DEMO_MODEL, EngineConfig(device="cpu", dtype="float32", threads=a.threads))
hf = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).eval()
ids = engine.tokenizer.encode(open(HELDOUT_TEXT).read()[:20000])[: a.tokens]
assert len(ids) == a.tokens


def ours():
    return engine.forward(ids, engine.new_state())[-1]


def theirs():
    with torch.inference_mode():
        return hf(torch.tensor([ids]), use_cache=True).logits[0, -1]


rel = float((ours() - theirs()).norm() / theirs().norm())
print(f"last-position logits, flashmoe vs transformers: relative error {rel:.2e}")
results = {"flashmoe": [], "transformers": []}
for r in range(a.rounds + 1):
    for name, fn in (("flashmoe", ours), ("transformers", theirs)):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if r:
            results[name].append((a.tokens / wall, a.tokens / cpu))
for name, runs in results.items():
    print(f"{name:12s} threads={a.threads}: wall median {statistics.median(w for w, _ in runs):7.1f} tok/s, "
          f"per CPU-second median {statistics.median(c for _, c in runs):7.1f} tok/s "
          f"(wall runs {', '.join(f'{w:.0f}' for w, _ in runs)})")
