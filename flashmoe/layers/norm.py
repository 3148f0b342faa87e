"""RMS norms of the Qwen3.5 / Qwen3-Next family, computed in fp32 like the reference."""

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w); the weight is stored as w (init 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_kernels(x):
            from ..kernels.norms import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)

    def add(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before the norm: (x + r, norm(x + r)), one launch with the kernels."""
        if kernels.use_kernels(x):
            from ..kernels.norms import add_rms_norm

            return add_rms_norm(x, r, self.weight, self.eps)
        x = x + r
        return x, self(x)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a plain weight (not 1 + w), then times silu(gate): the DeltaNet output norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)
