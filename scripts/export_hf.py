"""Export a packed flashmoe model back to a Hugging Face checkpoint: the dense weights as stored and
each expert record dequantized (exactly the values flashmoe computes with) into fused
`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I] tensors, the names
transformers 5's fused-expert classes and llama.cpp's convert_hf_to_gguf.py read. The other files
(config.json, tokenizer, chat template) are copied as they are. Checked on the bundled demo model
(transformers' Qwen3_5MoeForCausalLM loads it and its logits match flashmoe's to fp32 rounding;
docs/bench/2026-12-07c/), to run it on other engines with the same weights. Meant for small
models: it holds the whole checkpoint in memory.

Quantized experts are written in float32 (q * scale + bias in fp32 is not always a bfloat16 value);
16-bit ones keep their dtype. MXFP4 records (gpt-oss) go back to the release's layout, byte for
byte: `gate_up_proj_blocks` [E, 2I, H/32, 16] and `_scales` with gate and up rows interleaved again,
`down_proj_blocks` / `_scales`, the experts' biases, and the dense names as the release spells
them (flashmoe convert of the export writes the same records; llama.cpp's converter reads it).
Other families' experts with biases are not handled.

Usage: python3 scripts/export_hf.py [--model flashmoe/demo_model] --out /tmp/demo-hf
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import flashmoe from the repo root

from flashmoe.demo import DEMO_MODEL
from flashmoe.formats.packed import Manifest
from flashmoe.models import family

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def records(model_dir: Path, f) -> torch.Tensor:
    """One expert file's records [E, record_size] (uint8), each checked against its CRC-32."""
    data = (model_dir / f.file).read_bytes()
    size = len(data) // f.num_experts
    for e in range(f.num_experts):
        if zlib.crc32(data[e * size : (e + 1) * size]) != f.crc32[e]:
            raise SystemExit(f"{f.file}: record {e} fails its CRC-32")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(f.num_experts, size)


def interleaved(rows: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] gate rows then up rows -> gate, up, gate, up, ... (gpt-oss's order), a new tensor."""
    half = rows.shape[1] // 2
    return torch.stack([rows[:, :half], rows[:, half:]], dim=2).flatten(1, 2)


def expert_tensors(model_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Each MoE layer's records as fused tensors: dequantized, or MXFP4 as released."""
    layout = manifest.layout
    if layout.with_bias and layout.scheme != "mxfp4":
        raise SystemExit("experts with biases are handled by this export only as MXFP4 records (gpt-oss's release)")
    dtype = torch.float32 if layout.bits != 16 else torch.bfloat16
    out = {}
    for f in manifest.expert_files:
        prefix, rows = f"model.layers.{f.layer}.mlp.experts", records(model_dir, f)
        if layout.scheme == "mxfp4":
            v, E, H, I = layout.views(rows), f.num_experts, layout.hidden_size, layout.intermediate_size
            out[f"{prefix}.gate_up_proj_blocks"] = interleaved(v["gate_up_proj.blocks"]).reshape(E, 2 * I, H // 32, 16)
            out[f"{prefix}.gate_up_proj_scales"] = interleaved(v["gate_up_proj.scales"])
            out[f"{prefix}.gate_up_proj_bias"] = interleaved(v["gate_up_proj.bias"])
            out[f"{prefix}.down_proj_blocks"] = v["down_proj.blocks"].contiguous().reshape(E, H, I // 32, 16)
            out[f"{prefix}.down_proj_scales"] = v["down_proj.scales"].contiguous()
            out[f"{prefix}.down_proj_bias"] = v["down_proj.bias"].contiguous()
            continue
        gate_up, down = layout.weights(rows, dtype)
        out[f"{prefix}.gate_up_proj"], out[f"{prefix}.down_proj"] = gate_up, down
    return out


def release_names(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The dense tensors under the checkpoint's names: the family's renames undone."""
    renames = family(config.get("model_type")).NAMES.renames
    out = {}
    for name, t in tensors.items():
        for old, new in reversed(renames):
            name = name.replace(new, old)
        out[name] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="packed model directory")
    ap.add_argument("--out", type=Path, required=True, help="directory for the Hugging Face checkpoint")
    args = ap.parse_args()
    manifest = Manifest.load(args.model)
    tensors = release_names(load_file(args.model / manifest.dense_file), json.loads((args.model / "config.json").read_text()))
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
