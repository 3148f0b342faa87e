"""mlx-lm quantized checkpoints, written with numpy from a transformers model for the tests: MLX's
layout and arithmetic as mlx-lm's own files describe them (uint32 words, element j of a word at bit
bits * j; w = scales * q + biases per group of group_size inputs), built without flashmoe's quant.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flashmoe.formats.safetensors import save_file


def quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (uint32 words [..., out, in * bits / 32], bf16 scales and biases [..., out, in / group])."""
    g = w.float().numpy().reshape(*w.shape[:-1], -1, group)
    lo, hi = g.min(-1), g.max(-1)
    levels = (1 << bits) - 1
    scales = torch.from_numpy((hi - lo) / levels).clamp_min(1e-8).to(torch.bfloat16)
    biases = torch.from_numpy(lo).to(torch.bfloat16)
    q = np.clip(np.rint((g - biases.float().numpy()[..., None]) / scales.float().numpy()[..., None]), 0, levels)
    q = q.astype(np.uint64).reshape(*w.shape[:-1], -1, 32 // bits)
    words = (q << (np.arange(32 // bits, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)
    return torch.from_numpy(words), scales, biases


def dequantize(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """MLX's formula, in numpy fp32: scales * q + biases."""
    w = words.numpy().astype(np.uint64)[..., None] >> (np.arange(32 // bits, dtype=np.uint64) * bits)
    q = (w & ((1 << bits) - 1)).astype(np.float32).reshape(*words.shape[:-1], -1, group)
    out = scales.float().numpy()[..., None] * q + biases.float().numpy()[..., None]
    return torch.from_numpy(out.reshape(*words.shape[:-1], -1))


def to_mlx(model: torch.nn.Module, src: Path, out: Path, bits: int, group: int, overrides: dict[str, tuple[int, int]]
           ) -> dict[str, torch.Tensor]:
    """Write `model` (a tiny transformers qwen3_moe) as mlx-lm saves it quantized, into `out` (config,
    tokenizer from `src`); return the weights it now stands for (MLX's dequantization), by name."""
    out.mkdir(parents=True)
    tensors, stands_for = {}, {}

    def put(module: str, w: torch.Tensor) -> None:
        b, gs = overrides.get(module, (bits, group))
        words, scales, biases = quantize(w, b, gs)
        tensors.update({f"{module}.weight": words, f"{module}.scales": scales, f"{module}.biases": biases})
        stands_for[module] = dequantize(words, scales, biases, b, gs)

    for name, p in model.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith("experts.gate_up_proj"):
            layer = name.removesuffix(".experts.gate_up_proj")
            inter = p.shape[1] // 2
            put(f"{layer}.switch_mlp.gate_proj", p[:, :inter])
            put(f"{layer}.switch_mlp.up_proj", p[:, inter:])
        elif name.endswith("experts.down_proj"):
            put(name.replace("experts.down_proj", "switch_mlp.down_proj"), p)
        elif p.dim() == 2:
            put(module, p)
        else:
            tensors[name] = p.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": group, "bits": bits,
                              **{m: {"group_size": gs, "bits": b} for m, (b, gs) in overrides.items()}}
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return stands_for
