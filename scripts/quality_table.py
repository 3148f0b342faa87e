"""docs/QUALITY.md's table: what expert quantization and pruning cost a trained model.

Converts a Hugging Face checkpoint at 16, 8, 4 and 2 expert bits (reusing conversions already in
--workdir), then for each bits x K measures, against the 16-bit model at its own K, perplexity on
held-out text, KL(reference || model) and top-1 agreement (flashmoe.evaluate.compare), and for the
configurations in --validity the share of valid tool calls and JSON answers with and without the
grammar. Compute is fp32, so the numbers are quantization and pruning alone, not compute rounding.

    python scripts/quality_table.py --checkpoint /tmp/demo-hf --workdir /tmp/quality \
        --data flashmoe/demo_model/heldout.txt --prompts flashmoe/demo_model/eval_prompts.jsonl \
        --max-tokens 32768 --validity 4:8 --validity 2:2 --json docs/quality/demo.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flashmoe.convert import convert
from flashmoe.engine import Engine, EngineConfig
from flashmoe.evaluate import compare, load_prompts, read_text, structured_validity
from flashmoe.formats.packed import Manifest

BITS = (16, 8, 4, 2)


def packed(checkpoint: Path, workdir: Path, bits: int) -> Path:
    out = workdir / f"{bits}bit"
    try:
        Manifest.load(out)
    except (ValueError, OSError):
        convert(checkpoint, out, bits=bits, force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="the trained model, Hugging Face layout")
    ap.add_argument("--workdir", type=Path, required=True, help="where the conversions go (reused)")
    ap.add_argument("--data", type=Path, required=True, help="held-out text")
    ap.add_argument("--prompts", type=Path, help="tool-call / JSON prompts (JSONL) for --validity")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--validity", action="append", default=[], help="BITS:K to measure structured output for (repeatable)")
    ap.add_argument("--json", type=Path, help="write all rows here")
    args = ap.parse_args()

    torch.manual_seed(0)
    reference = Engine(packed(args.checkpoint, args.workdir, 16), EngineConfig(dtype="float32"))
    own_k = reference.top_k
    ks = sorted({own_k, own_k // 2, 2}, reverse=True)
    ids = reference.tokenizer.encode(read_text(args.data))
    prompts = load_prompts(args.prompts) if args.prompts else []
    rows = []
    for bits in BITS:
        engine = Engine(packed(args.checkpoint, args.workdir, bits), EngineConfig(dtype="float32"))
        for k in ks:
            engine.set_top_k(k)
            t0 = time.perf_counter()
            c = compare(engine, reference, ids, args.window, args.max_tokens)
            row = {"bits": bits, "k": k, "tokens": c.model.tokens, "ppl": c.model.ppl, "kl": c.kl, "top1": c.top1,
                   "reference_ppl": c.reference.ppl}
            if f"{bits}:{k}" in args.validity and prompts:
                for mode in ("unconstrained", "constrained"):
                    v = structured_validity(engine, prompts, mode == "constrained", args.gen_tokens)
                    row[mode] = {"tool_calls": [v.tool_valid, v.tool_total], "json": [v.json_valid, v.json_total]}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data),
                                         "window": args.window, "rows": rows}, indent=1))
    print("\n| expert bits | K | perplexity | KL (nats/token) | top-1 agreement |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['bits']} | {r['k']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.1%} |")


if __name__ == "__main__":
    main()
