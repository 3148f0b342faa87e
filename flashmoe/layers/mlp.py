"""SwiGLU MLPs: the dense MLP (dense layers, shared experts) and one routed expert's arithmetic."""

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .fused import Projections


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.in_proj = Projections(self, "gate_proj", "up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(*self.in_proj(x))

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The rest of the MLP, from the gate and up projections of its input."""
        if kernels.use_kernels(gate):
            from ..kernels.shared_expert import swiglu

            return self.down_proj(swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert on x [T, H]: gate_up [2I, H] (gate rows, then up rows), down [H, I]."""
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.t()
