"""flashmoe's CPU prefill of the demo model: a 512-token prompt (the first 512 tokens of the held-out
text), one Engine.forward over all of it from an empty state; median of 5 after one warm-up."""
import argparse, statistics, time
from flashmoe.config import EngineConfig
from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
from flashmoe.engine import Engine

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--dtype", default="float32")
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--runs", type=int, default=5)
a = ap.parse_args()
e = Engine(DEMO_MODEL, EngineConfig(device="cpu", dtype=a.dtype, threads=a.threads))
ids = e.tokenizer.encode(open(HELDOUT_TEXT).read()[:20000])[: a.tokens]
assert len(ids) == a.tokens
rates = []
for run in range(a.runs + 1):
    state = e.new_state()
    t0 = time.perf_counter()
    e.forward(ids, state)
    dt = time.perf_counter() - t0
    if run:
        rates.append(a.tokens / dt)
print(f"flashmoe prefill {a.dtype}, threads={a.threads}, {a.tokens} tokens: median {statistics.median(rates):.1f} tok/s "
      f"(runs {', '.join(f'{r:.1f}' for r in rates)})")
