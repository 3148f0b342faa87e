"""One decode token of one sequence on the CPU path, its layers run as their one-call kernels from a
single loop.

Through the model's modules (Model.forward) such a token spends about as long in Python as in its
kernels on the demo model (~1.1 ms each, EXPERIMENTS 110): module calls, step-context sections,
eligibility checks and small tensors made per call, for every layer. Here the same kernels run with
the same arguments: per layer the mixer's step (kernels/cpu_step.py, the weights its module
converted once) and the MoE half (experts/cpu_moe_step.py), then the model's own head. It is the
CPU's counterpart of a CUDA graph's replay (runtime/graphs.py): the modules' work for this token
without walking them, their logits to the bit (tests/runtime/test_cpu_decode.py).
"""

from __future__ import annotations

import time

import torch

from ..kernels import use_cpu_kernels
from ..kernels.cpu_step import attention_step, deltanet_layer_step
from ..layers.state import SequenceState
from ..models.transformer import Model


class CpuDecodeStep:
    """`step(token, state)` -> the logits [1, vocab] of one token continuing `state` (its caches
    written, its position left to the caller), as `Model.forward` computes them on the CPU path."""

    @staticmethod
    def obstacle(model: Model, moe_steps: list) -> str | None:
        """Why a token of this model cannot run this way, or None: every layer's mixer must take its
        one-call CPU step and every layer's MLP the MoE step."""
        probe = torch.empty(1, model.args.hidden_size)
        if model.hyper is not None or model.ngram_layers:
            return "hyper-connections or per-layer embeddings"
        if not use_cpu_kernels(probe):
            return "no CPU kernels (numba not installed, or a 16-bit model)"
        if len(moe_steps) != len(model.layers) or any(step is None for step in moe_steps):
            return "a layer without the CPU MoE step"
        for layer in model.layers:
            if not layer.mixer.takes_cpu_step(probe, layer.input_layernorm):
                return f"layer {layer.index}'s mixer has no one-call CPU step"
        return None

    def __init__(self, model: Model, moe_steps: list, timer) -> None:
        if (why := self.obstacle(model, moe_steps)) is not None:
            raise ValueError(f"the one-loop CPU decode does not cover {why}")
        self.model, self.moe_steps, self.timer = model, moe_steps, timer
        self.attends = any(not layer.is_linear for layer in model.layers)
        # each layer's mixer kernel and its weights (converted by the module once: loaded and fused
        # weights are not replaced); zipped with model.layers, which the bench may cut short
        with torch.inference_mode():  # as at a decode step: numpy views of the parameters
            self.mixers = [(deltanet_layer_step if layer.is_linear else attention_step,
                            layer.mixer.cpu_step_weights(layer.input_layernorm)) for layer in model.layers]

    @torch.inference_mode()
    def __call__(self, token: int, state: SequenceState) -> torch.Tensor:
        model, position = self.model, state.position
        x = model.model.embed_tokens(torch.tensor([token]))
        if self.attends:
            cos, sin = model.rotary(torch.tensor([position]))
        mixer = moe = 0.0
        for _, (step, weights), caches, moe_step in zip(model.layers, self.mixers, state.layers, self.moe_steps):
            t0 = time.perf_counter()
            if step is deltanet_layer_step:
                mixed = step(x, caches.conv, caches.recurrent, weights)
            else:
                caches.make_room(caches.length + 1)
                mixed = step(x, cos, sin, caches.k, caches.v, caches.length, weights)
                caches.length += 1
            t1 = time.perf_counter()
            x = moe_step(x, mixed)
            mixer, moe = mixer + t1 - t0, moe + time.perf_counter() - t1
        seconds = self.timer.seconds
        seconds["mixer"] += mixer
        seconds["moe_step"] += moe
        with self.timer.section("head"):
            return model.logits(x)
