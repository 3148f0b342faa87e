"""Export a packed flashmoe model back to a Hugging Face checkpoint: the dense weights as stored and
each expert record dequantized (exactly the values flashmoe computes with) into fused
`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I] tensors, the names
transformers 5's fused-expert classes and llama.cpp's convert_hf_to_gguf.py read. The other files
(config.json, tokenizer, chat template) are copied as they are. Checked on the bundled demo model
(transformers' Qwen3_5MoeForCausalLM loads it and its logits match flashmoe's to fp32 rounding;
docs/bench/2026-12-07c/), to run it on other engines with the same weights. Meant for small
models: it holds the whole checkpoint in memory.

Quantized experts are written in float32 (q * scale + bias in fp32 is not always a bfloat16 value);
16-bit ones keep their dtype. Families whose experts have biases or MXFP4 codes are not handled.

Usage: python3 scripts/export_hf.py [--model flashmoe/demo_model] --out /tmp/demo-hf
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import flashmoe from the repo root

from flashmoe.demo import DEMO_MODEL
from flashmoe.formats.packed import Manifest

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def expert_tensors(model_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Each MoE layer's records, checked against their CRC-32s and dequantized, as fused tensors."""
    layout = manifest.layout
    if layout.with_bias or layout.scheme != "affine":
        raise SystemExit("experts with biases or MXFP4 codes are not handled by this export")
    dtype = torch.float32 if layout.bits != 16 else torch.bfloat16
    out = {}
    for f in manifest.expert_files:
        data = (model_dir / f.file).read_bytes()
        gate_up, down = [], []
        for e in range(f.num_experts):
            raw = data[e * layout.record_size : (e + 1) * layout.record_size]
            if zlib.crc32(raw) != f.crc32[e]:
                raise SystemExit(f"{f.file}: record {e} fails its CRC-32")
            gu, d = layout.weights(torch.frombuffer(bytearray(raw), dtype=torch.uint8), dtype)
            gate_up.append(gu)
            down.append(d)
        out[f"model.layers.{f.layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"model.layers.{f.layer}.mlp.experts.down_proj"] = torch.stack(down)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="packed model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for the Hugging Face checkpoint")
    args = ap.parse_args()
    manifest = Manifest.load(args.model)
    tensors = load_file(args.model / manifest.dense_file)
    tensors.update(expert_tensors(args.model, manifest))
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out / "model.safetensors", metadata={"format": "pt"})
    for name in COPIED:
        if (args.model / name).exists():
            shutil.copy(args.model / name, args.out / name)
    n = sum(t.numel() for t in tensors.values())
    print(f"{args.out}: {len(tensors)} tensors, {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
