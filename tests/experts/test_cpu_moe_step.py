"""The CPU path's MoE half of a decode token in one call, in the engine: the same tokens and logits
as the eager layers, with every expert cached and with a cache that misses."""

import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.experts.cpu_moe_step import CpuMoEStep
from flashmoe.formats.packed import Manifest
from flashmoe.runtime.sampling import SamplingParams

pytest.importorskip("numba")

PROMPT = list(range(3, 12))


def greedy(engine: Engine) -> list[int]:
    return [s.token for s in engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]


def decode_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    state = engine.new_state()
    engine.forward(PROMPT, state)
    return torch.cat([engine.forward([t], state) for t in tokens])


def test_the_moe_step_decodes_as_the_eager_layers_do(packed4):
    engine = Engine(packed4, EngineConfig(dtype="float32"))
    steps = engine.moe_steps
    assert [s is not None for s in steps] == [i in engine.moe_layers for i in range(engine.args.num_hidden_layers)]
    fused = greedy(engine)  # every expert cached after the prompt's first tokens
    fused_logits = decode_logits(engine, fused)
    engine.moe_steps = []
    assert greedy(engine) == fused
    assert float((fused_logits - decode_logits(engine, fused)).norm() / fused_logits.norm()) < 1e-5


def test_a_step_whose_experts_are_not_all_cached_loads_them(packed4):
    """20 records of room for 4 layers of 8 experts, top-2: some steps find every chosen expert
    cached, others miss and go through the layer's routed experts (which load them) after the
    kernel's routing; the tokens are the eager path's either way."""
    record = Manifest.load(packed4).layout.record_size
    engine = Engine(packed4, EngineConfig(dtype="float32", host_mem=20 * record))
    steps, loaded = [s for s in engine.moe_steps if s is not None], []
    for step in steps:
        step.routed = lambda h, ids, w, residual, routed=step.routed: loaded.append(1) or routed(h, ids, w, residual)
    fused = greedy(engine)  # the prompt's step and 9 decode steps
    assert 0 < len(loaded) < 10 * len(steps)
    engine.moe_steps = []
    assert greedy(engine) == fused


def test_eight_bit_dense_weights_keep_the_eager_path(packed4):
    engine = Engine(packed4, EngineConfig(dtype="float32", dense_bits=8))
    assert all(s is None for s in engine.moe_steps)
    assert "bf16" in CpuMoEStep.obstacle(engine.model.layers[engine.moe_layers[0]])
