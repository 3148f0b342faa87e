"""SwiGLU MLPs: the dense MLP (dense layers, shared experts) and one routed expert's arithmetic."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .fused import Projections, project


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
        return project(self.down_proj, F.silu(gate) * up)


@dataclass(frozen=True, slots=True)
class Swiglu:
    """A routed expert's activation: silu(gate) * up, or with `limit` gpt-oss's clamped form: gate
    clamped above at limit, up to [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1)."""

    alpha: float = 1.0
    limit: float | None = None

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return F.silu(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (up + 1)


SILU = Swiglu()


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: Swiglu = SILU,
                  biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One routed expert on x [T, H]: gate_up [2I, H] (gate rows, then up rows), down [H, I], and
    where the expert has them (gpt-oss) biases (gate_up [2I], down [H])."""
    h = x @ gate_up.t()
    gate, up = (h if biases is None else h + biases[0]).chunk(2, dim=-1)
    y = act(gate, up) @ down.t()
    return y if biases is None else y + biases[1]
