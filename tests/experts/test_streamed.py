"""The CPU path's routed experts: a decode token through the numba kernel (records read where they
lie in the host cache) against PyTorch's dequantize-and-multiply, on the same engine."""

import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest
from flashmoe.experts.streamed import StreamedExperts
from flashmoe.runtime.sampling import SamplingParams


def experts_of(engine):
    return [e for e in engine.experts if isinstance(e, StreamedExperts)]


def test_kernel_decode_matches_pytorch_and_keeps_records_pinned(packed4):
    pytest.importorskip("numba")
    record = Manifest.load(packed4).layout.record_size
    # 5 records of room with top-2 routing over 8 experts: every token evicts, and a decode token's
    # chunk must stay in place while the kernel reads it
    engine = Engine(packed4, EngineConfig(dtype="float32", host_mem=5 * record))
    assert engine.cpu_kernel is not None and all(e.kernel is engine.cpu_kernel for e in experts_of(engine))
    layer = experts_of(engine)[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(1, engine.args.hidden_size, generator=g)
        ids = torch.randperm(8, generator=g)[:2].view(1, 2)
        weights = torch.softmax(torch.randn(1, 2, generator=g), -1)
        got = layer(x, ids, weights)
        layer.kernel = None
        want = layer(x, ids, weights)
        layer.kernel = engine.cpu_kernel
        assert got.shape == want.shape and got.dtype == x.dtype
        assert float((got - want).norm() / want.norm()) < 1e-5
    assert not engine.store.pins  # nothing left pinned
    prompt = list(range(3, 12))
    with_kernel = [s.token for s in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0))]
    for e in experts_of(engine):
        e.kernel = None
    engine.moe_steps = []  # the layers' one-call MoE steps read the records through the kernel too
    plain = [s.token for s in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0))]
    assert with_kernel == plain


def test_sixteen_bit_records_stay_with_pytorch(packed16):
    engine = Engine(packed16, EngineConfig(dtype="float32"))
    assert engine.cpu_kernel is None and all(e.kernel is None for e in experts_of(engine))
