"""The routing rules of the MoE families: router logits [T, E] -> (weights [T, k], expert ids [T, k]).

- softmax (Qwen): probabilities = softmax(logits) in fp32; the k most probable; renormalised over
  the k where `norm_topk`.
- sigmoid (GLM, MiniMax, DeepSeek): scores = sigmoid(logits) in fp32; the choice is made on
  scores + e_score_correction_bias (a per-expert bias learned for load balance), optionally only
  among the `topk_group` best of `n_group` groups of experts (a group's merit: the sum of its two
  best biased scores); the weights are the unbiased scores of the chosen, renormalised where
  `norm_topk`, times `routed_scaling_factor`.

`route_reference` is the definition (the transformers modeling files' arithmetic); on a GPU,
kernels/router.py computes every rule in one launch and is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True, slots=True)
class Routing:
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True
    correction_bias: bool = False  # sigmoid: choose by score + e_score_correction_bias
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0  # routed_scaling_factor

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"routing scoring must be softmax or sigmoid, not {self.scoring!r}")
        if self.scoring == "softmax" and (self.correction_bias or self.n_group != 1 or self.scaling != 1.0):
            raise ValueError("a correction bias, expert groups and routed scaling go with sigmoid routing")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be between 1 and n_group ({self.n_group}), got {self.topk_group}")

    def check(self, num_experts: int, k: int) -> None:
        """Raise if this rule cannot pick k of num_experts experts."""
        if num_experts % self.n_group:
            raise ValueError(f"{num_experts} experts do not split into n_group = {self.n_group} equal groups")
        if self.n_group > 1 and num_experts // self.n_group < 2:
            raise ValueError("grouped routing scores a group by its two best experts: groups need at least 2")
        if not 1 <= k <= num_experts // self.n_group * self.topk_group:
            raise ValueError(f"k = {k} experts cannot be chosen from {self.topk_group} of {self.n_group} groups "
                             f"of {num_experts // self.n_group}")


def route_reference(logits: torch.Tensor, k: int, rule: Routing, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] in logits' dtype, ids [T, k]), in the order torch.topk gives."""
    if rule.scoring == "softmax":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k, dim=-1)
    else:
        scores = torch.sigmoid(logits.float())
        choice = scores + bias.float() if bias is not None else scores
        if rule.n_group > 1:
            T, E = choice.shape
            groups = choice.view(T, rule.n_group, E // rule.n_group)
            merit = groups.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
            keep = torch.zeros_like(merit, dtype=torch.bool).scatter_(1, merit.topk(rule.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // rule.n_group, dim=1), float("-inf"))
        ids = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(1, ids)
    if rule.norm_topk:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if rule.scoring == "sigmoid" else 0.0))
    return (weights * rule.scaling).to(logits.dtype), ids
