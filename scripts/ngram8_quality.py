"""8-bit n-gram rows (`flashmoe convert --ngram-bits 8`, docs/FORMAT.md) against 16-bit ones, on
the CPU in about a minute:

1. tiny random qwen4_exp models (tests/conftest.py) with rows of the release's width (160 values),
   both initialisations, the tables as built and scaled x30 (so that the n-gram term dominates):
   the table's influence (logits with it zeroed), the prompt's logits' relative error and argmax
   agreement (teacher-forced, 64 positions), greedy agreement over 16 tokens; 8- and 4-bit
   experts beside them as yardsticks.
2. a trained model's sensitivity: the bundled demo model (qwen3_5_moe) with its input embedding
   rows stored as 8-bit n-gram rows (the head untouched): logits, top-1, KL and perplexity on
   2,048 held-out tokens.

Usage: python3 scripts/ngram8_quality.py [--seeds 11 21 31]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import flashmoe and tests from the repo root
from flashmoe.convert import convert  # noqa: E402
from flashmoe.engine import Engine, EngineConfig  # noqa: E402
from flashmoe.formats.packed import NgramFile  # noqa: E402
from tests.conftest import FAMILY_CONFIGS, build_hf_model  # noqa: E402
from tests.models.test_qwen4_exp import with_tensors  # noqa: E402
from tests.test_parity import our_run, rel_err  # noqa: E402

QUIET = Console(file=open("/dev/null", "w"))
WIDE = {**FAMILY_CONFIGS["qwen4_exp"]["text_config"], "ple_embed_dim": 1280}  # 8 heads of 160 values


def scaled_tables(src: Path, dst: Path, factor: float) -> Path:
    def change(tensors):
        for name in [n for n in tensors if "ngram_embedding.shard" in n]:
            tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)

    with_tensors(src, dst, change)
    return dst


def run(src: Path, out: Path, bits: int = 16, ngram_bits: int = 16):
    """(prompt logits [64, vocab], greedy tokens [16]) of src converted so."""
    convert(src, out, bits=bits, group_size=32, ngram_bits=ngram_bits, console=QUIET)
    engine = Engine(out, EngineConfig(dtype="float32"))
    prompt_logits, _, tokens = our_run(engine, torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(5)), 16)
    engine.close()
    return prompt_logits, tokens


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def tiny_models(root: Path, seeds: list[int]) -> None:
    print("init  seed  x  | influence | 8-bit rows: logits  argmax  greedy | 8-bit experts: logits greedy | 4-bit: logits greedy")
    for wide_init in (True, False):
        for seed in seeds:
            hf = root / f"hf-{wide_init}-{seed}"
            build_hf_model("qwen4_exp", hf, seed=seed, wide_init=wide_init, text_config=WIDE)
            for factor in (1.0, 30.0):
                src = hf if factor == 1 else scaled_tables(hf, root / f"{hf.name}-x30", factor)
                name = f"{src.name}-"
                (p16, t16), (p8, t8) = run(src, root / (name + "16")), run(src, root / (name + "n8"), ngram_bits=8)
                zeroed, _ = run(scaled_tables(hf, root / f"{hf.name}-x0-{factor}", 0.0), root / (name + "zero"))
                (pe8, te8), (pe4, te4) = run(src, root / (name + "e8"), bits=8), run(src, root / (name + "e4"), bits=4)
                argmax = float((p8.argmax(-1) == p16.argmax(-1)).float().mean())
                print(f"{'wide' if wide_init else 'hf  '}  {seed:>4} {factor:>3.0f} | {rel_err(zeroed, p16):9.3f} | "
                      f"{rel_err(p8, p16):18.4f} {argmax:7.1%} {agreeing_prefix(t8, t16):5d}/16 | "
                      f"{rel_err(pe8, p16):21.4f} {agreeing_prefix(te8, t16):3d}/16 | "
                      f"{rel_err(pe4, p16):13.4f} {agreeing_prefix(te4, t16):3d}/16", flush=True)


@torch.inference_mode()
def trained_embedding() -> None:
    demo = Path(__file__).resolve().parent.parent / "flashmoe" / "demo_model"
    engine = Engine(demo, EngineConfig(dtype="float32", device="cpu"))
    ids = engine.tokenizer.encode((demo / "heldout.txt").read_text()[:40000])[:2048]
    embedding = engine.model.model.embed_tokens
    weight = embedding.weight.float()
    table = NgramFile.for_layer(0, weight.shape[0], weight.shape[1], "int8")
    rows = table.decode(table.encode(weight))

    def logits() -> torch.Tensor:
        return torch.cat([engine.forward(ids[s : s + 512], engine.new_state(), last_only=False) for s in range(0, len(ids), 512)])

    reference = logits()
    hook = embedding.register_forward_hook(lambda module, inputs, out: torch.nn.functional.embedding(inputs[0], rows.to(out.dtype)))
    got = logits()
    hook.remove()
    targets = torch.tensor(ids[1:])
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    print(f"demo model, input embedding ({weight.shape[1]} values a row) in 8-bit rows: table {rel_err(rows, weight):.4f}; "
          f"logits {rel_err(got, reference):.4f}, top-1 {float((got.argmax(-1) == reference.argmax(-1)).float().mean()):.2%}, "
          f"KL {float(kl):.2e} nats/token, perplexity {float(torch.nn.functional.cross_entropy(reference[:-1], targets).exp()):.3f} "
          f"-> {float(torch.nn.functional.cross_entropy(got[:-1], targets).exp()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 21, 31])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        tiny_models(Path(root), args.seeds)
    trained_embedding()


if __name__ == "__main__":
    main()
