"""mlx-lm checkpoints as converter input. mlx-lm stores a quantized Linear (or Embedding) as
`<module>.weight` uint32 [out, in * bits / 32] (codes packed little-endian, element j of a word at
bit bits * j), `<module>.scales` and `<module>.biases` [out, in / group_size] in the model's 16-bit
type, with w = scales * q + biases per group: the record format's own arithmetic, so experts repack
bit for bit. A MoE layer's experts are stacked per projection under `switch_mlp` ([E, ...]).
config.json's `quantization` holds the default bits and group size, and per module either other
values or false (kept 16-bit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import quant
from ..utils import is_int, short_repr

FIX = "; this checkpoint's quantization is one flashmoe cannot read: convert the original 16-bit checkpoint instead"


class MlxFormatError(ValueError):
    pass


@dataclass(frozen=True)
class MlxQuantization:
    bits: int
    group_size: int
    overrides: dict[str, Any] = field(default_factory=dict)  # module path -> {"bits", "group_size"} or False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MlxQuantization | None":
        """The quantization an mlx-lm config.json declares (None: not an mlx-lm quantized checkpoint)."""
        q = config.get("quantization")
        if q is None:
            return None
        if not isinstance(q, dict):
            raise MlxFormatError(f"config.json: quantization is {short_repr(q)}, not an object{FIX}")
        mode = q.get("mode", "affine")
        if mode != "affine":
            raise MlxFormatError(f"config.json: quantization mode {short_repr(mode)} is not MLX's affine groups{FIX}")
        bits, group = q.get("bits"), q.get("group_size")
        overrides = {k: v for k, v in q.items() if k not in ("bits", "group_size", "mode")}
        made = cls(bits, group, overrides)
        made._check("config.json: quantization", bits, group)
        for module, value in overrides.items():
            if value is not False:
                if not isinstance(value, dict):
                    raise MlxFormatError(f"config.json: quantization[{module!r}] is {short_repr(value)}, not an object or false{FIX}")
                made._check(f"config.json: quantization[{module!r}]", value.get("bits"), value.get("group_size"))
        return made

    @staticmethod
    def _check(where: str, bits: Any, group: Any) -> None:
        if not (is_int(bits) and bits in quant.QUANT_BITS and is_int(group) and group > 0):
            raise MlxFormatError(f"{where} has bits {short_repr(bits)} and group_size {short_repr(group)}: flashmoe reads "
                                 f"{', '.join(map(str, quant.QUANT_BITS))}-bit codes in groups{FIX}")

    def of(self, module: str) -> tuple[int, int] | None:
        """(bits, group size) of a module's weight as mlx-lm names it, None where it is kept 16-bit."""
        value = self.overrides.get(module, {})
        if value is False:
            return None
        return value.get("bits", self.bits), value.get("group_size", self.group_size)


def dequantize(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group: int, name: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in] weights from one packed tensor and its scales and biases (fp32 arithmetic, then
    `dtype`), refusing shapes that disagree."""
    words = words.view(torch.int32)
    rows, k = words.shape[:-1], words.shape[-1] * 32 // bits
    if scales.shape != biases.shape or tuple(scales.shape) != (*rows, k // group) or k % group:
        raise MlxFormatError(f"{name}: codes {list(words.shape)} at {bits} bits, scales {list(scales.shape)} and biases "
                             f"{list(biases.shape)} do not describe one weight in groups of {group}{FIX}")
    flat = quant.dequantize(words.reshape(-1, words.shape[-1]), scales.reshape(-1, k // group),
                            biases.reshape(-1, k // group), bits, group, dtype)
    return flat.view(*rows, k)
