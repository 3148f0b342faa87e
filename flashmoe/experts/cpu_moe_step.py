"""The CPU path's MoE half of a decoder layer for a few tokens (a decode token, one per sequence of
a batch, a short prompt), in one compiled call (kernels/cpu_moe.py) over the expert records the
store already caches. The engine builds one per MoE layer whose weights and routing the kernel
covers (`obstacle` says why not); a call returns None for more than KERNEL_MAX_TOKENS tokens, and
the layer then runs its eager path. Chosen experts that are not cached, or
more than the kernel computes on one thread, go through the layer's StreamedExperts after the
kernel has done the rest of the layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels.cpu_experts import PARALLEL_MIN_BYTES, _half_pow2, _offsets
from ..kernels.cpu_moe import moe_kernel
from ..kernels.cpu_step import GEMV_MAX_BYTES
from ..layers.int8_linear import Bf16Linear
from ..moe.block import MoEBlock
from .streamed import KERNEL_MAX_TOKENS, StreamedExperts

if TYPE_CHECKING:
    from ..models.transformer import DecoderLayer


class CpuMoEStep:
    """`step(x, mixer_out)` -> x + mixer_out + the layer's MoE block of its post-attention norm
    [T, H], as DecoderLayer computes it eagerly, or None where the eager path must run. The chosen
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

    def __init__(self, layer: DecoderLayer, routed: StreamedExperts):
        """routed: the layer's routed experts (the store and the expert kernel it computes them
        with), which take the chosen experts the store does not cache."""
        if (why := self.obstacle(layer)) is not None:
            raise ValueError(f"layer {layer.index}: the CPU MoE step does not cover {why}")
        block, norm, store = layer.mlp, layer.post_attention_layernorm, routed.store
        self.block, self.routed, self.store, self.layer = block, routed, store, layer.index
        self.experts = routed.kernel  # CpuExperts: its thread count follows the engine's budget
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
        # The most experts the kernel computes on one thread: from there the expert kernel spreads
        # them over its threads (CpuExperts), where it has several.
        self.one_thread_records = (PARALLEL_MIN_BYTES - 1) // layout.record_size
        self._scratch: dict[tuple[int, int], tuple] = {}  # (tokens, k) -> the experts' input, ids, weights, the output

    def __call__(self, x: torch.Tensor, mixer_out: torch.Tensor) -> torch.Tensor | None:
        T, k = x.shape[0], self.block.top_k
        if T > KERNEL_MAX_TOKENS:
            return None  # a prefill chunk: PyTorch's matmuls, and the experts dequantized once
        most = self.one_thread_records if self.experts.threads > 1 else T * k
        if (scratch := self._scratch.get((T, k))) is None:
            # The kernel's outputs, made once: h, ids and weights no caller keeps; `out`, the layer's
            # output, is the next layer's input within the step and dead by this layer's next call
            # (a tensor made per call was 5% of a demo decode token: EXPERIMENTS 120).
            h, out = torch.empty(T, x.shape[1]), torch.empty(T, x.shape[1])
            ids, weights = torch.empty(T, k, dtype=torch.int64), torch.empty(T, k)
            scratch = self._scratch[T, k] = (h, ids, weights, out, h.numpy(), ids.numpy(), weights.numpy(), out.numpy())
        h, ids, weights, out, *arrays = scratch
        distinct = self.kernel(x.numpy(), mixer_out.numpy(), *self.constants, most, *arrays)  # inference tensors
        if not distinct:
            return self.routed(h, ids, weights, residual=out)  # loads what is not cached
        self.store.used_in_place(self.layer, ids, distinct)
        return out
