"""The MoE block every family shares: a router, a routing rule (moe/routing.py), the routed experts
(supplied by the runtime through the step's context: they live on disk and in caches, not here),
and a shared expert that is absent, plain (GLM: added), or sigmoid-gated (Qwen3.5: its output times
sigmoid(shared_expert_gate(x))).

The routed experts are any callable (x [T, H], ids [T, k], weights [T, k]) -> [T, H].
Checkpoint names differ by family; each family's `sanitize` maps them onto these: `gate` (the
router), `e_score_correction_bias`, `shared_expert.*`, `shared_expert_gate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..layers.fused import Projections
from ..layers.int8_linear import Int8Linear
from ..layers.mlp import MLP, SILU, Swiglu
from .routing import Routing, route_reference

RoutedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Tensors kept in fp32 whatever the model's dtype: the correction bias is added to fp32 scores,
# and rounding it to 16 bits would move routing decisions.
FP32_TENSORS = ("e_score_correction_bias",)


@dataclass(frozen=True, slots=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate: int  # of each routed expert
    routing: Routing = Routing()
    shared_intermediate: int = 0  # 0: no shared expert
    shared_gate: bool = False  # the shared expert's output times sigmoid(shared_expert_gate(x))
    router_fp32: bool = False  # the router's matmul in fp32 (GLM), not the model's dtype
    router_bias: bool = False  # the router adds a bias to its logits (gpt-oss)
    expert_bias: bool = False  # each routed expert's projections add biases (gpt-oss; in the records)
    act: Swiglu = SILU  # the routed experts' activation

    def __post_init__(self) -> None:
        self.routing.check(self.num_experts, self.top_k)
        if self.shared_gate and not self.shared_intermediate:
            raise ValueError("a shared expert gate needs a shared expert")


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, spec: MoESpec):
        super().__init__()
        self.spec, self.top_k = spec, spec.top_k
        self.gate = nn.Linear(hidden, spec.num_experts, bias=spec.router_bias)
        if spec.routing.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts))
        reads_input = [] if spec.router_fp32 else ["gate"]
        if spec.shared_gate:
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
            reads_input.append("shared_expert_gate")
        if spec.shared_intermediate:
            self.shared_expert = MLP(hidden, spec.shared_intermediate)
            reads_input += ["shared_expert.gate_proj", "shared_expert.up_proj"]
        # Everything that reads the block's input before the routed experts, the shared expert's
        # gate and up included (so its own in_proj goes unused): one matmul once fused.
        self.in_proj = Projections(self, *reads_input)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h [T, H] -> (router logits [T, E], the shared expert's inputs for add_shared)."""
        outs = self.in_proj(h)
        if self.spec.router_fp32:
            return F.linear(h.float(), self.gate.weight.float(), None if self.gate.bias is None else self.gate.bias.float()), outs
        return outs[0], outs[1:]

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k])."""
        bias = getattr(self, "e_score_correction_bias", None)
        if kernels.use_kernels(logits):
            from ..kernels.router import route

            return route(logits, self.top_k, self.spec.routing, bias)
        return route_reference(logits, self.top_k, self.spec.routing, bias)

    def add_shared(self, x: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        """x + the shared expert's output, from `project`'s shared inputs: x + [sigmoid(shared_gate) *]
        down_proj(silu(gate) * up). With the kernels, the elementwise steps take two launches, or
        none beside the int8 GEMV's (kernels/shared_expert.py)."""
        if not self.spec.shared_intermediate:
            return x
        shared_gate, (gate, up) = (inputs[0], inputs[1:]) if self.spec.shared_gate else (None, inputs)
        if not kernels.use_kernels(x):
            y = self.shared_expert.down(gate, up)
            return x + (torch.sigmoid(shared_gate) * y if shared_gate is not None else y)
        down_proj = self.shared_expert.down_proj
        if shared_gate is not None and isinstance(down_proj, Int8Linear) and down_proj.takes_gemv(gate):
            from ..kernels.int8_gemv import int8_gemv

            return int8_gemv(gate, down_proj.weight, down_proj.scale, up=up, shared_gate=shared_gate, residual=x)
        y = self.shared_expert.down(gate, up)
        if shared_gate is None:
            return x + y
        from ..kernels.shared_expert import gated_residual

        return gated_residual(x, shared_gate, y)
