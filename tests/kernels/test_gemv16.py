import pytest
import torch

from flashmoe.kernels.gemv16 import MAX_WEIGHTS, fits, gemv16, gemv16_reference
from flashmoe.layers import fused

from .conftest import rel


TOL = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}


# N = 37 leaves a partial row block (clamped rows); K = 100 is not a multiple of the step (masked
# tail) and K = 2500 takes three steps of 1024 (the next step's loads issued before the arithmetic).
@pytest.mark.parametrize("n,k,block_n", [(40, 64, 8), (37, 100, 4), (64, 2500, 2), (5, 256, None)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv16_matches_the_reference_on_fresh_inputs(device, poison, n, k, block_n, dtype):
    """fp32 accumulation, then one 16-bit rounding of the output: bf16's 8 significant bits leave
    up to 2^-8 (Triton's interpreter truncates), fp16's 11 bits 2^-11."""
    g = torch.Generator().manual_seed(n * k)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(1, k, generator=g).to(dtype)
    y = gemv16(x.to(device), w.to(device), block_n)
    assert y.shape == (1, n) and y.dtype == dtype
    assert rel(y, gemv16_reference(x, w)) < TOL[dtype]


def test_gemv16_reads_a_row_view_of_a_fused_weight(device):
    """The projections of one input share a weight (layers/fused.py): each reads its rows of it, and
    a column slice (rows not contiguous with each other) keeps its row stride."""
    g = torch.Generator().manual_seed(3)
    whole, x = torch.randn(48, 192, generator=g).bfloat16().to(device), torch.randn(1, 160, generator=g).bfloat16()
    view = whole[16:40, 32:]
    assert rel(gemv16(x.to(device), view), gemv16_reference(x, view.cpu())) < TOL[torch.bfloat16]


def test_gemv16_refuses_what_it_does_not_support():
    x, w = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert fits(x, w) and not fits(x.float(), w.float()) and not fits(torch.randn(2, 64).bfloat16(), w)
    assert not fits(x, w.t().contiguous().t()) and not fits(x[:, :1], torch.empty(MAX_WEIGHTS + 1, 1).bfloat16())
    with pytest.raises(ValueError, match="gemv16 takes"):
        gemv16(x, w.half())
    with pytest.raises(ValueError, match="gemv16 takes"):
        gemv16(x[:, :32], w)


def test_fused_projections_take_the_gemv_for_a_16bit_decode_row(device, monkeypatch):
    """Projections.__call__ sends a 16-bit decode row through gemv16 when the kernels are on, and gives
    what the plain Linear layers give."""
    monkeypatch.setattr("flashmoe.kernels.use_kernels", lambda x: True)
    calls = []
    real = gemv16
    monkeypatch.setattr("flashmoe.kernels.gemv16.gemv16", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    owner = torch.nn.Module()
    owner.a, owner.b = torch.nn.Linear(96, 40, bias=False), torch.nn.Linear(96, 24, bias=False)
    owner.to(device, torch.bfloat16)
    proj = fused.Projections(owner, "a", "b")
    proj.fuse()
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(5)).bfloat16().to(device)
    a, b = proj(x)
    assert calls == [1]
    w = owner.a.weight.cpu(), owner.b.weight.cpu()
    assert rel(a, gemv16_reference(x.cpu(), w[0])) < TOL[torch.bfloat16]
    assert rel(b, gemv16_reference(x.cpu(), w[1])) < TOL[torch.bfloat16]
