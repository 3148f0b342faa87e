"""A decode step of the CPU path (one token of each of up to KERNEL_MAX_TOKENS sequences), its
layers run as their one-call kernels from a single loop.

Through the model's modules (Model.forward) such a step spends about as long in Python as in its
kernels on the demo model (~1.1 ms each for one sequence, EXPERIMENTS 110): module calls,
step-context sections, eligibility checks and small tensors made per call, for every layer. Here
the same kernels run with the same arguments: per layer the mixer's one-call step (its module's
`decode_cpu_layer` or `decode_cpu`: kernels/cpu_step.py) and the MoE half (experts/cpu_moe_step.py),
then the head (the layers' normed projection where it is the tied bf16 table, else the model's
own). It is the CPU's counterpart of a CUDA graph's replay
(runtime/graphs.py): the modules' work for this step without walking them, their logits to fp32
rounding (tests/runtime/test_cpu_decode.py; the kernels' vectorized sums depend on their scratch
arrays' alignment, so not to the bit, as no two runs of either path are).
"""

from __future__ import annotations

import time

import torch

from ..experts.streamed import KERNEL_MAX_TOKENS
from ..kernels import use_cpu_kernels
from ..kernels.cpu_step import normed_gemv, normed_gemv_weights, takes_gemv
from ..layers.state import SequenceState
from ..models.transformer import Model


class CpuDecodeStep:
    """`step(ids, states, moe_steps)` -> the logits [B, vocab] of one token (ids [B]) continuing each of B
    states (their caches written, their positions left to the caller), as `Model.forward` computes
    them on the CPU path with the engine's MoE steps (the engine's own list, read at each call:
    where it empties them, as trace recording does, the modules' path runs instead)."""

    MAX_SEQUENCES = KERNEL_MAX_TOKENS  # the MoE step's most tokens

    @staticmethod
    def obstacle(model: Model, moe_steps: list) -> str | None:
        """Why a step of this model cannot run this way, or None: every layer's mixer must take its
        one-call CPU step and every layer's MLP the MoE step."""
        probe = torch.empty(1, model.args.hidden_size)
        if model.hyper is not None or model.ngram_layers:
            return "hyper-connections or per-layer embeddings"
        if not use_cpu_kernels(probe):
            return "no CPU kernels (numba not installed)"
        if len(moe_steps) != len(model.layers) or any(step is None for step in moe_steps):
            return "a layer without the CPU MoE step"
        for layer in model.layers:
            if not layer.mixer.takes_cpu_step(probe, layer.input_layernorm):
                return f"layer {layer.index}'s mixer has no one-call CPU step"
        return None

    def __init__(self, model: Model, moe_steps: list, timer) -> None:
        """moe_steps: the engine's at the start, checked to cover every layer."""
        if (why := self.obstacle(model, moe_steps)) is not None:
            raise ValueError(f"the one-loop CPU decode does not cover {why}")
        self.model, self.timer = model, timer
        self.attends = any(not layer.is_linear for layer in model.layers)
        # What the loop calls, looked up once: each submodule lookup goes through
        # nn.Module.__getattr__ and each module call through its hooks' checks, ~1 us apiece, a
        # few per layer and token (EXPERIMENTS 121). Per layer: is it linear attention, its
        # mixer's one-call step, its input norm.
        self.embed, self.rotary = model.model.embed_tokens.forward, model.rotary.forward
        self.layers = [(layer.is_linear, layer.mixer.decode_cpu_layer if layer.is_linear else layer.mixer.decode_cpu,
                        layer.input_layernorm) for layer in model.layers]
        # The head in one call as well where it is the tied bf16 table after a plain RMSNorm (the
        # layers' normed projection), not the norm's and the GEMV's wrappers: ~45 us of a demo
        # token. Else (an lm_head, int8 weights, a table too large for one thread) the model's own.
        table, norm = model.model.embed_tokens.weight, model.model.norm
        one_call = (model.args.tie_word_embeddings and table.dtype == torch.bfloat16 and norm.group is None
                    and takes_gemv(torch.empty(1, table.shape[1]), table))  # as Model.logits decides
        self.head = normed_gemv_weights(norm.weight, norm.eps, norm.zero_centred, table) if one_call else None

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, states: list[SequenceState], moe_steps: list) -> torch.Tensor:
        x = self.embed(ids)
        if self.attends:
            cos, sin = self.rotary(torch.tensor([state.position for state in states]))
        mixer = moe = 0.0
        for i, ((linear, step, norm), moe_step) in enumerate(zip(self.layers, moe_steps)):  # the bench may cut layers short
            t0 = time.perf_counter()
            caches = [state.layers[i] for state in states]
            mixed = step(x, norm, caches) if linear else step(x, norm, cos, sin, caches)
            t1 = time.perf_counter()
            x = moe_step(x, mixed)
            mixer, moe = mixer + t1 - t0, moe + time.perf_counter() - t1
        seconds = self.timer.seconds
        seconds["mixer"] += mixer
        seconds["moe_step"] += moe
        with self.timer.section("head"):
            return self.model.logits(x) if self.head is None else normed_gemv(x, self.head)
