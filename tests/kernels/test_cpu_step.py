import copy

import pytest
import torch

pytest.importorskip("numba")

from flashmoe import kernels

from .test_deltanet_step import eager_forward, random_layer_and_state


@pytest.mark.parametrize("gate", ["silu", "sigmoid"])
def test_the_cpu_deltanet_step_matches_the_eager_step(gate):
    """The numba step against the PyTorch path on fresh random weights and state, several tokens
    (the conv window and the recurrent state carry over), through the layer's own dispatch; the
    output norm gated by silu or (Qwen4-Exp) sigmoid."""
    g = torch.Generator().manual_seed(2)
    layer, state = random_layer_and_state("cpu", torch.float32, g)
    layer.norm.gate = gate
    layer.in_proj.fuse()  # as the engine runs it
    eager_state = copy.deepcopy(state)
    x = torch.randn(1, 64, generator=g)
    assert kernels.use_cpu_kernels(x) and not kernels.use_cpu_kernels(x.bfloat16())
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 64, generator=g)
            out = layer(x, [state], [slice(0, 1)])
            ref = eager_forward(layer, x, eager_state)
            assert float((out - ref).norm() / ref.norm()) < 1e-5, step
    assert float((state.conv - eager_state.conv).norm() / eager_state.conv.norm()) < 1e-6  # the projections' rounding
    assert float((state.recurrent - eager_state.recurrent).norm() / eager_state.recurrent.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gemv_matches_the_matmul(dtype):
    """A decode step's rows (one, and a batch's three) through the numba GEMV against PyTorch's
    matmul, for fp32 and bf16 weights (the CPU's Bf16Linear) and int8 codes with per-row scales
    (--dense-bits 8), on fresh random inputs of odd widths (bf16: 200 = 6 rounds of 32 and 8 left
    one at a time, 213 = 6 rounds, a block of 16 and 5 left); a batch's rows equal each row alone
    to the bit."""
    from flashmoe.kernels.cpu_step import GEMV_MAX_ROWS, gemv, takes_gemv

    g = torch.Generator().manual_seed(5)
    for width in (200, 213):
        if dtype == torch.int8:
            weight = torch.randint(-127, 128, (77, width), generator=g, dtype=torch.int8)
            scale = torch.rand(77, generator=g) / 100
        else:
            weight, scale = torch.randn(77, width, generator=g).to(dtype), None
        assert not takes_gemv(torch.randn(GEMV_MAX_ROWS + 1, width), weight)  # a prefill chunk's rows: PyTorch's
        for rows in (1, 3):
            x = torch.randn(rows, width, generator=g)
            want = x @ weight.float().t() * (1 if scale is None else scale)
            assert takes_gemv(x, weight)
            got = gemv(x, weight, scale)
            assert got.shape == (rows, 77) and float((got - want).norm() / want.norm()) < 1e-6
        assert torch.equal(got[1], gemv(x[1:2], weight, scale)[0])


def test_projections_of_a_decode_steps_rows_take_the_gemv(monkeypatch):
    """A decode step's rows' projection goes through the GEMV (and gives the Linear's result, bias
    added); a prefill chunk's go to PyTorch."""
    from flashmoe.kernels import cpu_step
    from flashmoe.layers.fused import project

    calls = []
    real = cpu_step.gemv
    monkeypatch.setattr(cpu_step, "gemv", lambda *a: calls.append(1) or real(*a))
    layer = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        for rows in (1, 2, cpu_step.GEMV_MAX_ROWS + 1):
            x = torch.randn(rows, 64)
            assert torch.allclose(project(layer, x), layer(x), atol=1e-6)
    assert len(calls) == 2


@pytest.mark.parametrize("zero_centred", [False, True])
def test_the_cpu_rms_norm_matches_the_eager_norm(zero_centred, monkeypatch):
    """Both weight forms, over the last dim of a [T, heads, d] input (the q/k norms' shape)."""
    from flashmoe.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(9)
    norm = RMSNorm(16, 1e-6, zero_centred)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
    x = torch.randn(2, 4, 16, generator=g) * 3
    got = norm(x)
    monkeypatch.setattr(kernels, "use_cpu_kernels", lambda x: False)
    want = norm(x)
    assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 1e-6


def test_a_bf16_linear_computes_its_stored_values_in_fp32():
    """Bf16Linear (the CPU's fp32 engines keep the checkpoint's bf16 weights): one row through the
    GEMV and several through the converted matmul both give x @ w.float()^T + bias in fp32."""
    from flashmoe.layers.fused import project
    from flashmoe.layers.int8_linear import Bf16Linear

    g = torch.Generator().manual_seed(13)
    layer = Bf16Linear(96, 40, bias=True)
    layer.weight = torch.randn(40, 96, generator=g).bfloat16()
    layer.bias = torch.randn(40, generator=g)
    for rows in (1, 5):
        x = torch.randn(rows, 96, generator=g)
        want = x @ layer.weight.float().t() + layer.bias
        for got in (project(layer, x), layer(x)):
            assert got.dtype == torch.float32 and float((got - want).norm() / want.norm()) < 1e-6



def with_bf16_projections(layer: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """The layer as the CPU engine holds it: fresh random weights, its projections Bf16Linear
    (the values rounded to bf16), fused."""
    from flashmoe.layers.int8_linear import use_bf16_linears

    with torch.no_grad():
        weights = {n: torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 for n, p in layer.named_parameters()}
        projections = set(use_bf16_linears(layer))
        for name, w in weights.items():
            module, _, kind = name.rpartition(".")
            setattr(layer.get_submodule(module), kind, w.bfloat16() if module in projections else torch.nn.Parameter(w))
    layer.in_proj.fuse()
    return layer


def random_norm(g: torch.Generator, zero_centred: bool):
    """A layer's input norm with random weights."""
    from flashmoe.layers.norm import RMSNorm

    norm = RMSNorm(64, 1e-6, zero_centred)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g) * 0.3)
    return norm


@pytest.mark.parametrize("gated", [True, False])
def test_the_cpu_attention_step_matches_the_eager_attention(gated, monkeypatch):
    """A decode token's input norm and attention in one numba call (Qwen3.5's gated form with
    zero-centred norms, and Qwen3's plain one) against the layer's eager path on fresh random bf16
    weights, several tokens after a prefill, the caches included (the one-call step writes its own)."""
    from flashmoe.layers.attention import Attention, AttentionSpec
    from flashmoe.layers.rotary import RotaryEmbedding
    from flashmoe.models.context import StepContext

    g = torch.Generator().manual_seed(21)
    layer = Attention(64, AttentionSpec(4, 2, 16, gated=gated, qk_norm="head"), 1e-6, zero_centred_norms=gated)
    layer, norm = with_bf16_projections(layer, g), random_norm(g, gated)
    rotary, ctx = RotaryEmbedding(8, 10000.0), StepContext([None])
    caches = [layer.new_state(torch.float32, "cpu") for _ in range(2)]
    with torch.no_grad():
        for position in range(6):
            tokens = 3 if position == 0 else 1  # a prefill first (PyTorch), then decode tokens
            x = torch.randn(tokens, 64, generator=g)
            cos, sin = rotary(torch.arange(caches[0].length, caches[0].length + tokens))
            assert layer.takes_cpu_step(x[:1], norm) and not layer.takes_cpu_step(x[:1], None)
            got = layer(x, cos, sin, caches[:1], ctx, norm)
            with monkeypatch.context() as m:
                m.setattr(Attention, "takes_cpu_step", lambda *args: False)
                want = layer(x, cos, sin, caches[1:], ctx, norm)
            assert float((got - want).norm() / want.norm()) < 1e-5, position  # measured ~1e-7
    assert caches[0].length == caches[1].length == 8
    assert torch.allclose(caches[0].k[:8], caches[1].k[:8], atol=1e-6) and torch.equal(caches[0].v[:8], caches[1].v[:8])


def test_the_cpu_deltanet_layer_step_matches_the_eager_layer(monkeypatch):
    """A decode token's input norm, projections and DeltaNet step in one numba call, against the
    layer's eager path (projections apart), on fresh random bf16 weights and state, several tokens."""
    from flashmoe.layers.deltanet import GatedDeltaNet

    g = torch.Generator().manual_seed(22)
    layer, state = random_layer_and_state("cpu", torch.float32, g)
    layer, norm = with_bf16_projections(layer, g), random_norm(g, True)
    with torch.no_grad():
        layer.A_log.copy_(torch.rand(4, generator=g) * 2)  # decays of a usable range
    eager_state = copy.deepcopy(state)
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(1, 64, generator=g)
            assert layer.takes_cpu_step(x, norm) and not layer.takes_cpu_step(x, None)
            got = layer(x, [state], [slice(0, 1)], norm)
            with monkeypatch.context() as m:
                m.setattr(GatedDeltaNet, "takes_cpu_step", lambda *args: False)
                want = layer(x, [eager_state], [slice(0, 1)], norm)
            assert float((got - want).norm() / want.norm()) < 1e-5, step
    assert float((state.recurrent - eager_state.recurrent).norm() / eager_state.recurrent.norm()) < 1e-5
    assert torch.allclose(state.conv, eager_state.conv, atol=1e-6)


def test_a_batch_of_decode_tokens_takes_the_batched_cpu_steps(monkeypatch):
    """One token of each of three sequences of different lengths through the attention and the
    DeltaNet layers (their projections for all three at once, each's attention or recurrence on
    its own state) against each sequence's eager path, on fresh random bf16 weights and states,
    several steps; the caches and states included."""
    from flashmoe.layers import attention as attention_module, deltanet as deltanet_module
    from flashmoe.layers.attention import Attention, AttentionSpec
    from flashmoe.layers.rotary import RotaryEmbedding
    from flashmoe.models.context import StepContext

    batched = []
    for module, name in ((attention_module, "attention_steps"), (deltanet_module, "deltanet_layer_steps")):
        real = getattr(module, name)  # the layers' own references to kernels/cpu_step's functions
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: batched.append(name) or real(*a))
    g = torch.Generator().manual_seed(23)
    attention = with_bf16_projections(Attention(64, AttentionSpec(4, 2, 16, gated=True, qk_norm="head"), 1e-6, True), g)
    deltanet = with_bf16_projections(random_layer_and_state("cpu", torch.float32, g)[0], g)
    norm, rotary = random_norm(g, True), RotaryEmbedding(8, 10000.0)
    caches = [attention.new_state(torch.float32, "cpu") for _ in range(3)]
    states = [random_layer_and_state("cpu", torch.float32, g)[1] for _ in range(3)]
    with torch.no_grad():
        for cache, n in zip(caches, (1, 4, 2)):  # prefills of different lengths
            x = torch.randn(n, 64, generator=g)
            attention(x, *rotary(torch.arange(n)), [cache], StepContext([None]), norm)
        eager_caches, eager_states = copy.deepcopy(caches), copy.deepcopy(states)
        for step in range(3):
            x = torch.randn(3, 64, generator=g)
            cos, sin = rotary(torch.tensor([c.length for c in caches]))
            ctx = StepContext([None] * 3, [1, 1, 1])
            got = torch.cat([attention(x, cos, sin, caches, ctx, norm), deltanet(x, states, ctx.slices(3), norm)], 1)
            with monkeypatch.context() as m:
                m.setattr(kernels, "use_cpu_kernels", lambda x: False)
                want = torch.cat([torch.cat([attention(x[b : b + 1], cos[b : b + 1], sin[b : b + 1], [eager_caches[b]],
                                                       StepContext([None]), norm),
                                             deltanet(x[b : b + 1], [eager_states[b]], [slice(0, 1)], norm)], 1)
                                  for b in range(3)])
            assert float((got - want).norm() / want.norm()) < 1e-5, step  # measured ~1e-7
    assert batched == ["attention_steps", "deltanet_layer_steps"] * 3
    for cache, eager in zip(caches, eager_caches):
        assert cache.length == eager.length and torch.allclose(cache.k[: cache.length], eager.k[: eager.length], atol=1e-5)
        assert torch.allclose(cache.v[: cache.length], eager.v[: eager.length], atol=1e-5)
    for state, eager in zip(states, eager_states):
        assert float((state.recurrent - eager.recurrent).norm() / eager.recurrent.norm()) < 1e-5
        assert torch.allclose(state.conv, eager.conv, atol=1e-5)
