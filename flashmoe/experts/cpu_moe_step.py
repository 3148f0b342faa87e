"""The CPU path's MoE half of a decoder layer for one decode token, in one compiled call
(kernels/cpu_moe.py) over the expert records the store already caches. The engine builds one per
MoE layer whose weights and routing the kernel covers (`obstacle` says why not); a call returns None
for what it does not cover (several tokens, a chosen expert not cached, records the expert kernel
would spread over threads), and the layer then runs its eager path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels.cpu_experts import PARALLEL_MIN_BYTES, CpuExperts, _half_pow2, _offsets
from ..kernels.cpu_moe import moe_kernel
from ..kernels.cpu_step import GEMV_MAX_BYTES
from ..layers.int8_linear import Bf16Linear
from ..moe.block import MoEBlock
from .store import ExpertStore

if TYPE_CHECKING:
    from ..models.transformer import DecoderLayer


class CpuMoEStep:
    """`step(x, mixer_out)` -> x + mixer_out + the layer's MoE block of its post-attention norm
    [1, H], as DecoderLayer computes it eagerly, or None where the eager path must run. The chosen
    experts count as the store's hits, as a load would count them.

    The records are read where they lie in the store's pool without pinning them: the engine's
    steps run one at a time, and nothing else loads into the store while one runs."""

    @staticmethod
    def obstacle(layer: DecoderLayer) -> str | None:
        """Why the kernel cannot compute this layer's MoE half, or None."""
        block, norm = layer.mlp, getattr(layer, "post_attention_layernorm", None)
        if not isinstance(block, MoEBlock):
            return "a dense MLP"
        spec = block.spec
        if norm is None or norm.group is not None:
            return "hyper-connections"
        if spec.routing.scoring != "softmax" or spec.router_fp32 or spec.router_bias:
            return "a routing rule other than softmax top-k over an unbiased router"
        fused = block.in_proj.one_matrix(Bf16Linear)
        down = block.shared_expert.down_proj if spec.shared_intermediate else None
        if fused is None or down is not None and type(down) is not Bf16Linear:
            return "projections not stored as one bf16 matrix (16-bit weights only, not --dense-bits 8 or fp32 files)"
        if fused.bias is not None or down is not None and down.bias is not None:
            return "biased projections"
        if fused.weight.numel() * 2 > GEMV_MAX_BYTES:
            return "projections too large for one thread"
        return None

    def __init__(self, layer: DecoderLayer, store: ExpertStore, experts: CpuExperts):
        if (why := self.obstacle(layer)) is not None:
            raise ValueError(f"layer {layer.index}: the CPU MoE step does not cover {why}")
        block, norm = layer.mlp, layer.post_attention_layernorm
        self.block, self.store, self.experts, self.layer = block, store, experts, layer.index
        spec, layout = block.spec, store.layout
        self.kernel = moe_kernel(layout, spec.act)
        shared = spec.shared_intermediate
        down = block.shared_expert.down_proj.weight if shared else torch.empty(layout.hidden_size, 0, dtype=torch.bfloat16)
        pool = store.pool.numpy()
        # The kernel's arguments that do not change between calls, as numpy arrays once (each
        # conversion costs about a microsecond per call).
        self.constants = (norm.weight.detach().numpy(), np.float32(norm.eps), norm.zero_centred,
                          block.in_proj.one_matrix(Bf16Linear).weight.view(torch.uint16).numpy(), down.view(torch.uint16).numpy(),
                          spec.shared_gate, spec.routing.norm_topk, store.slot_table()[layer.index], pool,
                          pool.view(np.uint16), _offsets(layout), layout.intermediate_size, _half_pow2())
        self.record_size = layout.record_size

    def __call__(self, x: torch.Tensor, mixer_out: torch.Tensor) -> torch.Tensor | None:
        k = self.block.top_k
        if x.shape[0] != 1 or self.experts.threads > 1 and k * self.record_size >= PARALLEL_MIN_BYTES:
            return None  # several tokens, or experts that CpuExperts spreads over its threads
        ids, out = np.empty(k, np.int64), torch.empty(x.shape, dtype=torch.float32)
        if not self.kernel(x.detach().numpy(), mixer_out.detach().numpy(), *self.constants, ids, out.numpy()):
            return None
        self.store.used_in_place(self.layer, ids.tolist())
        return out
