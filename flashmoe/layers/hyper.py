"""Hyper-connections (Qwen4-Exp): the residual is `streams` copies of the hidden state side by side
[T, streams * H] instead of one. Before each mixer and each MLP, a gate reads all the streams
(each RMS-normed on its own) and mixes them into the block's one input; the block's output is then
added back to every stream, each with its own learned share. The model's last mix (no block after
it) gives the head its input: it takes the place of the final norm.

The mix: m = sigmoid(W_up silu(W_down n / streams)) over the normed streams n, the input is the
mean over streams of m * n; the shares are 2 sigmoid(W_inject n / streams).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm


@dataclass(frozen=True, slots=True)
class HyperSpec:
    streams: int  # copies of the hidden state in the residual
    rank: int  # of the low-rank gate that mixes them


class HyperConnection(nn.Module):
    def __init__(self, hidden: int, spec: HyperSpec, eps: float, zero_centred_norms: bool, injects: bool = True):
        super().__init__()
        self.hidden, self.streams = hidden, spec.streams
        width = spec.streams * hidden
        self.hc_norm = RMSNorm(width, eps, zero_centred_norms, group=hidden)
        self.input_mix_weight_down = nn.Linear(width, spec.rank, bias=False)
        self.input_mix_weight_up = nn.Linear(spec.rank, width, bias=False)
        self.block_inject_weight = nn.Linear(width, spec.streams, bias=False) if injects else None

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """streams [T, streams * H] -> (the block's input [T, H], each stream's share of the
        block's output [T, streams]; None for the model's last mix, which injects nothing)."""
        normed = self.hc_norm(streams)
        mix = torch.sigmoid(self.input_mix_weight_up(F.silu(self.input_mix_weight_down(normed) / self.streams)))
        mixed = (mix * normed).unflatten(-1, (self.streams, self.hidden)).mean(dim=-2)
        if self.block_inject_weight is None:
            return mixed, None
        return mixed, 2 * torch.sigmoid(self.block_inject_weight(normed) / self.streams)

    @staticmethod
    def inject(streams: torch.Tensor, out: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
        """The residual after a block: each stream plus its share of the block's output out [T, H]."""
        return streams + (shares.unsqueeze(-1) * out.unsqueeze(-2)).flatten(-2)
