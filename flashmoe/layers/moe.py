"""SwiGLU MLPs and the sparse MoE block: router (fp32 softmax, top-k, renormalise), routed experts,
and the sigmoid-gated shared expert. The routed experts are supplied by the runtime (they live on
disk and in caches, not in this module): any callable (x [T, H], ids [T, k], weights [T, k]) -> [T, H].
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .fused import Projections
from .int8_linear import Int8Linear

RoutedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, shared_intermediate: int, norm_topk: bool = True):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.shared_expert = MLP(hidden, shared_intermediate)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        # Everything that reads the MoE's input before the routed experts, the shared expert's gate
        # and up included (so its own in_proj goes unused): one matmul once fused.
        self.in_proj = Projections(self, "gate", "shared_expert_gate", "shared_expert.gate_proj", "shared_expert.up_proj")
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.experts: RoutedExperts | None = None  # attached by the runtime

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] (in the model dtype) -> (weights [T, k] in that dtype, expert ids [T, k])."""
        if kernels.use_kernels(logits):
            from ..kernels.router import route

            return route(logits, self.top_k, self.norm_topk)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(logits.dtype), ids

    def add_shared(self, x: torch.Tensor, shared_gate: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """x + the gated shared expert, from the in_proj outputs after the router's:
        x + sigmoid(shared_gate) * down_proj(silu(gate) * up). With the kernels, the elementwise
        steps take two launches, or none beside the int8 GEMV's (kernels/shared_expert.py)."""
        if not kernels.use_kernels(x):
            return x + torch.sigmoid(shared_gate) * self.shared_expert.down(gate, up)
        down_proj = self.shared_expert.down_proj
        if isinstance(down_proj, Int8Linear) and down_proj.takes_gemv(gate):
            from ..kernels.int8_gemv import int8_gemv

            return int8_gemv(gate, down_proj.weight, down_proj.scale, up=up, shared_gate=shared_gate, residual=x)
        from ..kernels.shared_expert import gated_residual

        return gated_residual(x, shared_gate, self.shared_expert.down(gate, up))
