"""SwiGLU MLPs and the sparse MoE block: router (fp32 softmax, top-k, renormalise), routed experts,
and the sigmoid-gated shared expert. The routed experts are supplied by the runtime (they live on
disk and in caches, not in this module): any callable (x [T, H], ids [T, k], weights [T, k]) -> [T, H].
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

RoutedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        self.top_k = top_k
        self.norm_topk = norm_topk
        self.experts: RoutedExperts | None = None  # attached by the runtime

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x.dtype, expert ids [T, k])."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(logits.dtype), ids

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
