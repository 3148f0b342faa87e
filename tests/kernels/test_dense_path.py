"""The model with its dense part on the kernels (forced onto CPU tensors, in Triton's interpreter)
against the PyTorch path it replaces on CUDA: the wiring, not only each kernel alone."""

import collections

import pytest
import torch

from flashmoe import kernels
from flashmoe.engine import Engine, EngineConfig
from flashmoe.kernels import attention_decode, deltanet_step, norms, rope, router, shared_expert
from flashmoe.convert import convert
from flashmoe.layers.attention import Attention, AttentionSpec
from flashmoe.layers.rotary import RotaryEmbedding
from flashmoe.layers.state import KVCache
from flashmoe.models.context import StepContext

from ..conftest import build_hf_model
from ..test_parity import our_run, rel_err

# Kernels on CPU tensors need the interpreter, which tests/conftest.py sets only without a GPU;
# there, tests/test_gpu.py runs them in the real model (graphed and eager) against the CPU path.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels in Triton's interpreter (no GPU)")

KERNELS = {
    norms: ["rms_norm", "add_rms_norm"],
    rope: ["norm_rope"],
    router: ["route"],
    attention_decode: ["attention_decode"],
    deltanet_step: ["conv_step", "delta_step"],
    shared_expert: ["swiglu", "gated_residual"],
}


@pytest.fixture
def counted(monkeypatch) -> collections.Counter:
    """Calls of each kernel function (the layers import them at call time, so the wrappers are seen)."""
    calls = collections.Counter()
    for module, names in KERNELS.items():
        for name in names:
            def wrapper(*args, _f=getattr(module, name), _name=name, **kwargs):
                calls[_name] += 1
                return _f(*args, **kwargs)

            monkeypatch.setattr(module, name, wrapper)
    return calls


# What each family's dense part runs beyond the common kernels (norms, router, rotary, attention)
FAMILY_KERNELS = {
    "qwen3_5_moe": {"conv_step", "delta_step", "swiglu", "gated_residual"},  # DeltaNet, gated shared expert
    "qwen3_moe": {"swiglu"},  # a dense-MLP layer
    "minimax_m2": set(),  # no shared expert, q/k norm across heads (rms_norm), rotary alone
    "glm4_moe": {"swiglu"},  # plain shared expert and a dense layer, q/k norm per head
    "gpt_oss": set(),  # sinks and sliding windows in the decode attention, biased router
}


@pytest.fixture(scope="module", params=sorted(FAMILY_KERNELS))
def family_model(request, packed16, tmp_path_factory):
    if request.param == "qwen3_5_moe":
        return request.param, packed16
    d = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, d / "hf", seed=9)
    convert(d / "hf", d / "packed", bits=16)
    return request.param, d / "packed"


def test_kernels_give_the_logits_of_the_pytorch_path(family_model, monkeypatch, counted):
    model_type, packed = family_model
    engine = Engine(packed, EngineConfig(dtype="float32"))
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(6))
    ref_prompt, ref_steps, ref_tokens = our_run(engine, prompt, 4)
    assert not counted
    monkeypatch.setattr(kernels, "use_kernels", lambda x: True)
    got_prompt, got_steps, got_tokens = our_run(engine, prompt, 4)
    assert set(counted) == {"rms_norm", "add_rms_norm", "norm_rope", "route", "attention_decode"} | FAMILY_KERNELS[model_type]
    assert rel_err(got_prompt, ref_prompt) <= 1e-5  # fp32 sums in another order
    assert rel_err(got_steps, ref_steps) <= 1e-5
    assert got_tokens == ref_tokens


@pytest.mark.parametrize("spec,window", [(AttentionSpec(4, 2, 16, gated=True, qk_norm="head"), None),
                                         (AttentionSpec(4, 2, 16, qkv_bias=True, o_bias=True, sinks=True), 3)])
def test_a_batch_in_a_graph_attends_in_one_launch_as_each_sequence_alone(monkeypatch, spec, window):
    """A batch's graphed decode step (runtime/graphs.py records it with the caches' kv_offsets in
    the context): every sequence's key and value land in its own reserved cache at its device
    position, and its output is what it gets alone on the PyTorch path, with no per-sequence
    launch (gpt-oss's sinks and window too)."""
    g = torch.Generator().manual_seed(9)
    layer = Attention(64, spec, eps=1e-6, zero_centred_norms=True, window=window)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 5.0))
    rotary = RotaryEmbedding(4, 10000.0)
    lengths = [5, 1, 8]
    eager = [KVCache(2, 16, torch.float32, "cpu") for _ in lengths]
    graphed = [KVCache(2, 16, torch.float32, "cpu") for _ in lengths]
    x = torch.randn(sum(lengths) + 3 * len(lengths), 64, generator=g)
    eager_ctx = StepContext([])
    with torch.no_grad():
        at = 0
        for n, e, c in zip(lengths, eager, graphed):
            cos, sin = rotary(torch.arange(n))
            layer(x[at : at + n], cos, sin, [e], eager_ctx)
            layer(x[at : at + n], cos, sin, [c], eager_ctx)
            at += n
        for i, c in enumerate(graphed):
            c.reserve(24 + 8 * i)  # buffers of different sizes, as a pool's slots grow alone
        offsets = attention_decode.kv_offsets([c.k for c in graphed], [c.v for c in graphed])
        position = torch.tensor(lengths)
        ctx = StepContext([], [1] * len(lengths), graph_position=position, kv_offsets={id(graphed[0]): offsets})
        for step in range(3):
            tokens = x[at : at + len(lengths)]
            at += len(lengths)
            refs = []
            for i, e in enumerate(eager):
                cos, sin = rotary(torch.tensor([e.length]))
                refs.append(layer(tokens[i : i + 1], cos, sin, [e], eager_ctx))
            with monkeypatch.context() as m:
                m.setattr(kernels, "use_kernels", lambda x: True)
                m.setattr(attention_decode, "attention_decode", None)  # no sequence's own launch
                cos, sin = rotary(position)
                got = layer(tokens, cos, sin, graphed, ctx)
            for c in graphed:
                c.length += 1
            position += 1
            for i, (e, c) in enumerate(zip(eager, graphed)):
                # the batch's projections round apart from one token's
                assert torch.allclose(c.k[: c.length], e.k[: e.length], atol=1e-5)
                assert torch.allclose(c.v[: c.length], e.v[: e.length], atol=1e-5)
                assert float((got[i] - refs[i][0]).norm() / refs[i].norm()) < 1e-5, (step, i)


def test_a_batch_step_recorded_as_the_graphs_record_it_gives_each_sequence_its_logits(packed16, monkeypatch):
    """The step context a batch's decode graph is recorded with (runtime/graphs.py: device
    positions, reserved caches of different sizes, the batch's kv_offsets), run without capture
    through the kernels: each sequence's logits as the batch's eager step on the PyTorch path,
    twice (the caches' lengths advanced as a replay's runner advances them). Qwen3.5's layers
    (DeltaNet beside gated attention); the other families' attention variants are the layer test's
    above, and their graphs run in tests/test_gpu.py on the device (~18 s a family here)."""
    from flashmoe.runtime.graphs import batch_kv_offsets

    engine = Engine(packed16, EngineConfig(dtype="float32"))
    prompts = [[5, 9, 14, 3, 8], [11], [7, 2, 6, 1, 12, 4, 10, 13]]
    states = [engine.new_state() for _ in prompts]
    with torch.inference_mode():
        for prompt, state in zip(prompts, states):
            engine.forward(prompt, state)
        plain = [state.clone() for state in states]
        for i, state in enumerate(states):
            for cache in state.layers:
                if isinstance(cache, KVCache):
                    cache.reserve(16 + 8 * i)
        tokens = [3, 4, 5]
        for _ in range(2):
            want = engine.forward_batch([[t] for t in tokens], plain)
            ctx = StepContext(states, [1] * len(states), experts=engine.experts,
                              graph_position=torch.tensor([s.position for s in states]),
                              kv_offsets=batch_kv_offsets(states))
            with monkeypatch.context() as m:
                m.setattr(kernels, "use_kernels", lambda x: True)
                m.setattr(attention_decode, "attention_decode", None)  # no sequence's own launch
                got = engine.model(torch.tensor(tokens), ctx)
            for state, token in zip(states, tokens):
                state.advance_graphed(token)
            assert rel_err(got, want) <= 1e-5
            tokens = [int(t) for t in want.argmax(-1)]
