"""Projections that read the same input, computed as one matmul.

A decode step is latency-bound: each small projection is a launch of its own that finishes long
before its weights could saturate HBM. So each layer names the Linear layers that read its input
(`Projections`), and `fuse()`, called once after the weights are loaded, concatenates their
weights into one tensor and makes each layer's own weight a row view of it: checkpoint names,
resident memory and every layer called alone (the router for the prefetch guess) stay as they were.

With --dense-bits 8 the Int8Linear swap comes first (on the meta model, before loading; fusing then
quantizing would also quantize the 16-bit gates): int8 rows and their per-row scales concatenate
exactly, but an int8 layer and a 16-bit one cannot share a matmul, so each run of same-kind layers
becomes one matmul.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import kernels
from .int8_linear import Int8Linear

Group = tuple[nn.Module, list[int]]  # (a layer computing several outputs side by side, their widths)


class Projections:
    """The Linear / Int8Linear layers `owner.<name>` of one input, in order. Calling it
    returns their outputs: one matmul per layer until `fuse()`, then one per run of same-kind layers.
    Layers are looked up by name until then, because --dense-bits 8 swaps them after construction."""

    def __init__(self, owner: nn.Module, *names: str):
        self.owner, self.names = owner, names
        self.fused: list[Group] | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        groups = self.fused or [(m, [m.out_features]) for m in self.layers()]
        return [y for layer, widths in groups for y in project(layer, x).split(widths, dim=-1)]

    def layers(self) -> list[nn.Module]:
        return [self.owner.get_submodule(name) for name in self.names]

    def one_matrix(self, kind: type) -> nn.Module | None:
        """The single fused layer, where fusing made one of exactly this kind (the CPU's one-call
        decode steps read its weight whole), else None."""
        if self.fused is None or len(self.fused) != 1 or type(self.fused[0][0]) is not kind:
            return None
        return self.fused[0][0]

    @torch.no_grad()
    def fuse(self) -> None:
        """Once, with the weights on their final device: moving the model afterwards would copy
        each view into a tensor of its own and leave the fused weights behind."""
        runs = [list(run) for _, run in itertools.groupby(self.layers(), key=type)]
        self.fused = [(run[0] if len(run) == 1 else concatenated(run), [m.out_features for m in run]) for run in runs]


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) (an nn.Linear or Int8Linear), with a decode row taken by a GEMV kernel: on the GPU
    the Triton one through a small 16-bit weight (kernels/gemv16.py), where cuBLAS is launch-bound;
    on the CPU numba's (kernels/cpu_step.py), where PyTorch reads a weight out of cache at a fifth of
    the memory's rate."""
    if isinstance(layer, nn.Linear) and kernels.use_kernels(x):
        from ..kernels.gemv16 import fits, gemv16

        rows = x.reshape(-1, layer.in_features)
        if fits(rows, layer.weight):
            y = gemv16(rows, layer.weight).view(*x.shape[:-1], layer.out_features)
            return y if layer.bias is None else y + layer.bias
    elif kernels.use_cpu_kernels(x):
        from ..kernels.cpu_step import gemv, takes_gemv

        if takes_gemv(x, layer.weight):
            y = gemv(x, layer.weight, layer.scale if isinstance(layer, Int8Linear) else None).view(*x.shape[:-1], -1)
            return y if layer.bias is None else y + layer.bias
    return layer(x)


def concatenated(layers: list[nn.Module]) -> nn.Module:
    """One layer of their kind with all their output rows; their weights (and Int8Linear scales)
    become row views of its own."""
    first, out = layers[0], sum(m.out_features for m in layers)
    with torch.device("meta"):  # shapes only: the tensors are assigned below
        if isinstance(first, Int8Linear):  # or its 16-bit kind, Bf16Linear
            fused = type(first)(first.in_features, out, first.bias is not None)
        else:
            fused = nn.Linear(first.in_features, out, bias=first.bias is not None)
    for name, _ in [*first.named_parameters(recurse=False), *first.named_buffers(recurse=False)]:
        whole = torch.cat([getattr(m, name) for m in layers])
        for m, rows in zip([fused, *layers], [whole, *whole.split([m.out_features for m in layers])]):
            # a parameter must be replaced by a parameter (Int8Linear's tensors are buffers)
            setattr(m, name, nn.Parameter(rows, requires_grad=False) if isinstance(getattr(m, name), nn.Parameter) else rows)
    return fused
