"""gpt-oss checkpoints in the release's MXFP4 layout, made from a 16-bit one for the tests: each
expert tensor becomes `<name>_blocks` [E, out, in / 32, 16] uint8 and `<name>_scales` [E, out, in / 32]
uint8 (rows are output features, as gpt-oss ships them), and config.json gains the release's
quantization_config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flashmoe.formats.safetensors import Checkpoint, save_file

MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] weights -> (blocks [..., K / 32, 16] uint8, scales [..., K / 32] uint8): per group of 32
    the power of two that brings its largest magnitude to at most 6, each weight the nearest E2M1."""
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = groups / torch.exp2(exponent)[..., None]
    index = (q.abs()[..., None] - MAGNITUDES).abs().argmin(-1) | torch.where(q < 0, 8, 0)
    codes = index.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def to_mxfp4_release(src: Path, out: Path) -> None:
    """Rewrite the 16-bit gpt-oss checkpoint in `src` ([E, in, out] expert tensors) as its MXFP4 release in `out`."""
    out.mkdir(parents=True)
    tensors = {}
    with Checkpoint(src) as ckpt:
        for name in ckpt.names():
            t = ckpt.read(name)
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
            else:
                tensors[name] = t
    save_file(tensors, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                     "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "generation_config.json"):
        if (src / name).exists():
            (out / name).write_bytes((src / name).read_bytes())
