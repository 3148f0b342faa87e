"""The CPU path's decode step in one loop over the layers' kernels (runtime/cpu_decode.py): the
module path's logits to fp32 rounding, one sequence and a batch, every expert cached and a cache
that misses; a model it does not cover keeps the module path. Not to the bit: the numba kernels'
vectorized sums split at their scratch arrays' alignment, which differs from call to call, so even
one path run twice differs in the last bits (relative 3e-7 measured). Where the demo's experts run
as integer dot products (kernels/cpu_experts.py INT8_DOTS), such a difference in an expert's input
now and then crosses a rounding boundary of its quantization, one step of 1/32258 of its group's
largest value: relative 1e-5 .. 6e-5 measured, greedy tokens the same."""

import pytest
import torch

from flashmoe.demo import DEMO_MODEL
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest
from flashmoe.kernels import cpu_experts
from flashmoe.runtime.cpu_decode import CpuDecodeStep

pytest.importorskip("numba")

# how far two runs of the demo's CPU decode may differ (module docstring)
ROUNDING = 2e-4 if cpu_experts._kind(Manifest.load(DEMO_MODEL).layout) == cpu_experts.INT8_DOTS else 2e-6


def decode(engine: Engine, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits after `prompt`."""
    state, tokens, rows = engine.new_state(), [], []
    logits = engine.forward(prompt, state)
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = engine.forward(tokens[-1:], state)
        rows.append(logits)
    return tokens, torch.cat(rows)


def counted(monkeypatch) -> list[int]:
    """The tokens every engine's one-loop decode takes from now on."""
    calls, call = [], CpuDecodeStep.__call__
    monkeypatch.setattr(CpuDecodeStep, "__call__", lambda self, ids, *rest: calls.extend(ids.tolist()) or call(self, ids, *rest))
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_one_loop_decode_gives_the_module_paths_logits(monkeypatch):
    """The demo model (DeltaNet and attention layers, every one with MoE experts), every expert
    cached: the same kernels on the same arguments."""
    engine = Engine(DEMO_MODEL, EngineConfig(dtype="float32"))
    prompt = engine.tokenizer.encode("import os\ndef walk(path):")
    assert engine.cpu_decode is not None
    calls = counted(monkeypatch)
    decode(engine, prompt, 24)  # caches every expert these tokens use (a miss is computed as it arrives)
    tokens, logits = decode(engine, prompt, 24)
    assert calls[24:] == tokens  # every decode token took the loop
    engine.cpu_decode = None
    module_tokens, module_logits = decode(engine, prompt, 24)
    assert module_tokens == tokens and rel(module_logits, logits) < ROUNDING


def test_one_loop_decode_loads_what_is_not_cached(monkeypatch):
    """40 records of room for 8 layers x 64 experts: most steps miss, and the layers' MoE steps
    load them; two engines from the same start. Experts read from disk are added in the order they
    arrive, so the logits agree to fp32 rounding, not to the bit."""
    record = Manifest.load(DEMO_MODEL).layout.record_size
    config = EngineConfig(dtype="float32", host_mem=40 * record)
    engine, modules = Engine(DEMO_MODEL, config), Engine(DEMO_MODEL, config)
    assert engine.cpu_decode is not None
    calls, modules.cpu_decode = counted(monkeypatch), None
    prompt = engine.tokenizer.encode("import os\ndef walk(path):")
    tokens, logits = decode(engine, prompt, 24)
    assert calls == tokens and engine.store.stats.misses > 40
    module_tokens, module_logits = decode(modules, prompt, 24)
    assert module_tokens == tokens and rel(module_logits, logits) < max(ROUNDING, 1e-5)


def test_a_model_with_a_dense_mlp_or_8_bit_weights_keeps_the_module_path(packed4):
    engine = Engine(packed4, EngineConfig(dtype="float32", dense_bits=8))
    assert engine.cpu_decode is None and "MoE step" in CpuDecodeStep.obstacle(engine.model, engine.moe_steps)


def test_a_batch_step_in_one_loop_gives_the_module_paths_logits(monkeypatch):
    """Three sequences of different lengths, a token each per step (Engine.forward_batch), every
    expert cached: each layer's batched kernels, as the modules call them."""
    engine = Engine(DEMO_MODEL, EngineConfig(dtype="float32"))
    prompts = [engine.tokenizer.encode(text) for text in ("import os\ndef walk(path):", "class A:\n", "x = [")]

    def steps(n: int) -> torch.Tensor:
        states = [engine.new_state() for _ in prompts]
        logits = torch.cat([engine.forward(p, s) for p, s in zip(prompts, states)])
        rows = []
        for _ in range(n):
            logits = engine.forward_batch([[int(t)] for t in logits.argmax(-1)], states)
            rows.append(logits)
        return torch.cat(rows)

    assert engine.cpu_decode is not None
    calls = counted(monkeypatch)
    steps(12)  # caches the experts these steps use
    one_loop = steps(12)
    assert len(calls) == 2 * 12 * 3  # every step took the loop, three tokens each
    engine.cpu_decode = None
    assert rel(steps(12), one_loop) < ROUNDING
