"""Block-FP8 checkpoints as converter input (DeepSeek-V3's format, used by the official FP8 releases
of Qwen3, MiniMax-M2, GLM-4.5 and Qwen3.8-Flash-Next): `<module>.weight` float8_e4m3fn [N, K] and
`<module>.weight_scale_inv` [ceil(N / bn), ceil(K / bk)] (fp32, bf16 or UE8M0), one factor per block
of config.json's `quantization_config.weight_block_size` (default 128 x 128), by which the block's
values are multiplied: w = fp8 * scale_inv. The converter dequantizes them (exactly, in fp32) and
stores or requantizes the result as it would a 16-bit checkpoint's."""

from __future__ import annotations

from typing import Any

import torch

from ..utils import is_int, short_repr

SCALE_SUFFIX = "_scale_inv"  # weight -> weight_scale_inv
FIX = "; convert the checkpoint's 16-bit release instead"


class Fp8FormatError(ValueError):
    pass


def block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The FP8 blocks a config.json declares (quant_method "fp8"), or None for other checkpoints."""
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise Fp8FormatError(f"config.json: quantization_config.fmt {short_repr(fmt)} is not e4m3{FIX}")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(is_int(b) and b > 0 for b in block)):
        raise Fp8FormatError(f"config.json: quantization_config.weight_block_size is {short_repr(block)}, "
                             f"not two positive integers{FIX}")
    return block[0], block[1]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """[..., N, K] float8 weights times their blocks' factors -> fp32, refusing scales of another shape."""
    *lead, n, k = weight.shape
    bn, bk = block
    want = (*lead, -(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != want:
        raise Fp8FormatError(f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}; a {list(weight.shape)} weight in "
                             f"blocks of {bn} x {bk} needs {list(want)}{FIX}")
    scale = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]
    return weight.float() * scale
