"""The CPU path's decode token in one loop over the layers' kernels (runtime/cpu_decode.py): the
module path's logits to the bit, with every expert cached and with a cache that misses; a model
it does not cover keeps the module path."""

import pytest
import torch

from flashmoe.demo import DEMO_MODEL
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest
from flashmoe.runtime.cpu_decode import CpuDecodeStep

pytest.importorskip("numba")


def decode(engine: Engine, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits after `prompt`."""
    state, tokens, rows = engine.new_state(), [], []
    logits = engine.forward(prompt, state)
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = engine.forward(tokens[-1:], state)
        rows.append(logits)
    return tokens, torch.cat(rows)


def counted(engine: Engine) -> list[int]:
    """The tokens the engine's one-loop decode takes from now on."""
    one_loop, calls = engine.cpu_decode, []
    assert one_loop is not None
    engine.cpu_decode = lambda token, state: calls.append(token) or one_loop(token, state)
    return calls


def test_one_loop_decode_gives_the_module_paths_logits_to_the_bit():
    """The demo model (DeltaNet and attention layers, every one with MoE experts), every expert
    cached: the same kernels on the same arguments."""
    engine = Engine(DEMO_MODEL, EngineConfig(dtype="float32"))
    prompt = engine.tokenizer.encode("import os\ndef walk(path):")
    calls = counted(engine)
    decode(engine, prompt, 24)  # caches every expert these tokens use (a miss is computed as it arrives)
    tokens, logits = decode(engine, prompt, 24)
    assert calls[24:] == tokens  # every decode token took the loop
    engine.cpu_decode = None
    module_tokens, module_logits = decode(engine, prompt, 24)
    assert module_tokens == tokens and torch.equal(module_logits, logits)


def test_one_loop_decode_loads_what_is_not_cached():
    """40 records of room for 8 layers x 64 experts: most steps miss, and the layers' MoE steps
    load them; two engines from the same start. Experts read from disk are added in the order they
    arrive, so the logits agree to fp32 rounding, not to the bit."""
    record = Manifest.load(DEMO_MODEL).layout.record_size
    config = EngineConfig(dtype="float32", host_mem=40 * record)
    engine, modules = Engine(DEMO_MODEL, config), Engine(DEMO_MODEL, config)
    calls, modules.cpu_decode = counted(engine), None
    prompt = engine.tokenizer.encode("import os\ndef walk(path):")
    tokens, logits = decode(engine, prompt, 24)
    assert calls == tokens and engine.store.stats.misses > 40
    module_tokens, module_logits = decode(modules, prompt, 24)
    assert module_tokens == tokens
    assert float((module_logits - logits).norm() / logits.norm()) < 1e-5


def test_a_model_with_a_dense_mlp_or_8_bit_weights_keeps_the_module_path(packed4):
    engine = Engine(packed4, EngineConfig(dtype="float32", dense_bits=8))
    assert engine.cpu_decode is None and "MoE step" in CpuDecodeStep.obstacle(engine.model, engine.moe_steps)
