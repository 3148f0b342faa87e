"""Where the GPU path leaves the CPU path: a tiny random model of a family (tests/conftest.py),
converted at 16 bits, run by both engines in fp32 (prefill, then decode steps); each decoder layer's,
mixer's and dense MLP's output compared, first the step, then the module where the relative error
passes 1e-5. A device-run diagnostic, for tests/test_gpu.py failures.

Usage: python3 scripts/gpu_layer_diff.py [family ...] [--graphs]"""

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
    ap.add_argument("families", nargs="*", default=["qwen3_moe", "glm4_moe", "qwen3_5_moe"])
    ap.add_argument("--graphs", action="store_true")
    args = ap.parse_args()
    print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "precision", torch.get_float32_matmul_precision(),
          "cudnn tf32", torch.backends.cudnn.allow_tf32)
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(3))
    for family in args.families:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            build_hf_model(family, d / "hf", seed=10)
            convert(d / "hf", d / "q16", bits=16)
            cpu = traced(Engine(d / "q16", EngineConfig(dtype="float32", threads=1)), ids, 4)
            gpu = traced(Engine(d / "q16", EngineConfig(device="cuda", dtype="float32", cuda_graphs=args.graphs)), ids, 4)
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
