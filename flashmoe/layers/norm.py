"""RMS norms, computed in fp32 like the references.

Two forms of the weight: Qwen3.5 / Qwen3-Next store w of a zero-centred (1 + w) and multiply in
fp32 before rounding; the other families store the weight itself and multiply the normalised
value after rounding it to the input's dtype (Llama's order). At fp32 the two orders agree; at
16 bits each rounds where its reference does.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, or * (1 + w) with `zero_centred` (w stored, init 0).
    With `group`, each run of `group` values is normalised on its own (the hyper-connection
    streams, layers/hyper.py), the weight still spanning all `dim`."""

    def __init__(self, dim: int, eps: float, zero_centred: bool = False, group: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim), requires_grad=False)
        self.eps, self.zero_centred, self.group = eps, zero_centred, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_kernels(x) and self.group is None:
            from ..kernels.norms import rms_norm

            return rms_norm(x, self.weight, self.eps, self.zero_centred)
        if self.group is None:
            from ..kernels import cpu_step

            if cpu_step.takes_rows(x):  # a decode step's few fp32 rows on the CPU
                return cpu_step.rms_norm(x, self.weight, self.eps, self.zero_centred)
        xf = x.float() if self.group is None else x.float().unflatten(-1, (-1, self.group))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = out if self.group is None else out.flatten(-2)
        if self.zero_centred:
            return (out * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * out.to(x.dtype)

    def add(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before the norm: (x + r, norm(x + r)), one launch with the kernels."""
        if kernels.use_kernels(x):
            from ..kernels.norms import add_rms_norm

            return add_rms_norm(x, r, self.weight, self.eps, self.zero_centred)
        x = x + r
        return x, self(x)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a plain weight, then times silu(gate), or sigmoid(gate) with gate="sigmoid"
    (Qwen4-Exp's output_gate_type): the DeltaNet output norm."""

    def __init__(self, dim: int, eps: float, gate: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.gate = eps, gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        act = torch.sigmoid if self.gate == "sigmoid" else F.silu
        return (self.weight * normed * act(gate.float())).to(x.dtype)
