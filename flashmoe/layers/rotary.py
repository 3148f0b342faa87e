"""Partial rotary position embedding (NeoX rotate-half) on the first `rotary_dim` dims of each head,
with YaRN's frequency blend and attention factor where the config asks for it (gpt-oss)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class Yarn:
    """YaRN (arXiv 2309.00071): frequencies that turn more than once over the original context keep
    their value, those that turn less are divided by `factor`, with a linear ramp between the two
    correction dims; cos and sin are multiplied by the attention factor."""

    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # round the correction dims outward
    attention_factor: float | None = None  # default 0.1 ln(factor) + 1 (or the mscale ratio)
    mscale: float | None = None
    mscale_all_dim: float | None = None

    @property
    def scale(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _mscale(self.factor, self.mscale) / _mscale(self.factor, self.mscale_all_dim)
        return _mscale(self.factor)

    def inv_freq(self, wavelengths: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
        """The blended inverse frequencies [dim / 2] from theta ** (2i / dim) (in transformers' order
        of operations: at position 10^5 one ulp of a frequency moves cos by 1e-3)."""
        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a ramp of width 0 would divide by it
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=wavelengths.device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        return 1.0 / (self.factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    # No buffers: the frequencies (rotary_dim / 2 values) are computed at the first call on each
    # device, so a model built on the meta device and loaded with assign=True needs nothing else
    # materialised; kept, since recomputing them was ~10 us of a CPU decode token.
    def __init__(self, rotary_dim: int, theta: float, yarn: Yarn | None = None):
        super().__init__()
        self.rotary_dim, self.theta, self.yarn = rotary_dim, theta, yarn
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if (inv_freq := self._inv_freq.get(device)) is None:
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
            wavelengths = self.theta**exponents
            inv_freq = 1.0 / wavelengths if self.yarn is None else self.yarn.inv_freq(wavelengths, self.rotary_dim, self.theta)
            if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():  # not in a graph's own memory
                self._inv_freq[device] = inv_freq
        return inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rotary_dim] in fp32."""
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        if self.yarn is not None:
            return emb.cos() * self.yarn.scale, emb.sin() * self.yarn.scale
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; rotates x[..., :rotary_dim] and passes the rest through."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
