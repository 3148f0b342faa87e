"""Where the GPU path leaves the CPU path: a tiny random model of a family (tests/conftest.py),
converted at 16 bits, run by both engines in fp32 (prefill, then decode steps); each decoder layer's,
mixer's and dense MLP's output compared, first the step, then the module where the relative error
passes 1e-5. A device-run diagnostic, for tests/test_gpu.py failures.

tests/test_gpu.py's family test runs the copying path (--no-preload) against a CPU engine on every
core, 8 decode steps: --no-preload --steps 8 --cpu-threads 0 reproduce that.

Usage: python3 scripts/gpu_layer_diff.py [family ...] [--graphs] [--no-preload] [--steps N] [--cpu-threads N]"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashmoe.convert import convert  # noqa: E402
from flashmoe.engine import Engine, EngineConfig  # noqa: E402
from tests.conftest import build_hf_model  # noqa: E402


def traced(engine: Engine, ids: torch.Tensor, steps: int) -> list[dict[str, torch.Tensor]]:
    """Per call (the prefill, then each decode step): module name -> its output (fp32, CPU)."""
    calls: list[dict[str, torch.Tensor]] = []

    def hook(name):
        def record(module, args, out):
            calls[-1][name] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu()
        return record

    for i, layer in enumerate(engine.model.layers):
        layer.register_forward_hook(hook(f"layer {i}"))
        layer.mixer.register_forward_hook(hook(f"layer {i} mixer"))
        if not hasattr(layer.mlp, "route"):
            layer.mlp.register_forward_hook(hook(f"layer {i} dense mlp"))
    state = engine.new_state()
    with torch.inference_mode():
        calls.append({})
        calls[-1]["logits"] = engine.forward(ids.to(engine.device), state, last_only=False).float().cpu()
        for t in range(steps):
            calls.append({})
            calls[-1]["logits"] = engine.forward(torch.tensor([t + 3], device=engine.device), state).float().cpu()
    return calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*", default=["qwen3_moe", "glm4_moe", "gpt_oss"])
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--no-preload", action="store_true", help="the GPU engine copies experts (preload=False)")
    ap.add_argument("--steps", type=int, default=4, help="decode steps after the prefill")
    ap.add_argument("--cpu-threads", type=int, default=1, help="the CPU engine's threads (0: its default)")
    args = ap.parse_args()
    print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "precision", torch.get_float32_matmul_precision(),
          "cudnn tf32", torch.backends.cudnn.allow_tf32)
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(3))
    for family in args.families:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            build_hf_model(family, d / "hf", seed=10)
            convert(d / "hf", d / "q16", bits=16)
            cpu = traced(Engine(d / "q16", EngineConfig(dtype="float32", threads=args.cpu_threads or None)), ids, args.steps)
            gpu = traced(Engine(d / "q16", EngineConfig(device="cuda", dtype="float32", cuda_graphs=args.graphs,
                                                        preload=False if args.no_preload else None)), ids, args.steps)
        print(f"== {family}")
        for step, (c, g) in enumerate(zip(cpu, gpu)):
            errs = {name: float((g[name] - ref).norm() / ref.norm().clamp_min(1e-30)) for name, ref in c.items() if name in g}
            worst = max(errs.values())
            first = next((n for n in c if errs.get(n, 0) > 1e-5), None)
            print(f"  call {step}: logits {errs['logits']:.2e}, worst {worst:.2e}, first above 1e-5: {first}")
            if step == 0 or first:
                print("    " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))


if __name__ == "__main__":
    main()
