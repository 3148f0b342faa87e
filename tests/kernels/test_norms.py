import pytest
import torch

from flashmoe.kernels.norms import add_rms_norm, rms_norm
from flashmoe.layers.norm import RMSNorm

from .conftest import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_norm(H: int, g: torch.Generator, dtype, zero_centred: bool = True) -> RMSNorm:
    """A CPU RMSNorm (the reference path) with a non-trivial weight."""
    norm = RMSNorm(H, eps=1e-6, zero_centred=zero_centred)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=g) * 0.3 + (not zero_centred))
    return norm.to(dtype)


def rows(T: int, H: int, g: torch.Generator, dtype, stride: int | None = None) -> torch.Tensor:
    """[T, H] random rows; with `stride`, a column slice of wider rows (as a fused projection's output)."""
    x = torch.randn(T, stride or H, generator=g) * 3
    return x[:, :H].to(dtype)


# H = 100 is not a power of two (masked tail); 4096 is the 397B's hidden size.
@pytest.mark.parametrize("T,H", [(1, 64), (3, 100), (2, 256), (1, 4096)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("zero_centred", [True, False], ids=["1+w", "w"])
def test_norm_matches_the_eager_norm(device, poison, T, H, dtype, tol, zero_centred):
    g = torch.Generator().manual_seed(T * 1000 + H)
    norm = random_norm(H, g, dtype, zero_centred)
    x = rows(T, H, g, dtype, stride=H + 7)
    out = rms_norm(x.to(device), norm.weight.to(device), norm.eps, zero_centred)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel(out, norm(x)) < tol


@pytest.mark.parametrize("T,H", [(1, 64), (3, 100), (1, 4096)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("zero_centred", [True, False], ids=["1+w", "w"])
def test_fused_add_matches_add_then_norm(device, poison, T, H, dtype, tol, zero_centred):
    g = torch.Generator().manual_seed(T * 1000 + H + 1)
    norm = random_norm(H, g, dtype, zero_centred)
    x, r = rows(T, H, g, dtype), rows(T, H, g, dtype, stride=H + 3)
    total, out = add_rms_norm(x.to(device), r.to(device), norm.weight.to(device), norm.eps, zero_centred)
    ref_total, ref_out = norm.add(x, r)
    assert total.dtype == out.dtype == dtype
    if dtype == torch.float32:  # the interpreter rounds to bf16 by truncation: exact only on the GPU (below)
        assert torch.equal(total.cpu(), ref_total)
    assert rel(total, ref_total) < tol and rel(out, ref_out) < tol


def test_leading_dimensions_are_kept(device):
    g = torch.Generator().manual_seed(7)
    norm = random_norm(32, g, torch.float32)
    x = torch.randn(2, 3, 32, generator=g)
    out = rms_norm(x.to(device), norm.weight.to(device), norm.eps, True)
    assert out.shape == (2, 3, 32) and rel(out, norm(x)) < 1e-6


@cuda
def test_bf16_sum_is_rounded_as_the_eager_add():
    """The residual stream the kernel hands on is bit for bit the eager `x + h`; the norm of it
    rounds like the eager norm (one bf16 ulp at most, where fp32 rsqrt and sum order differ)."""
    g = torch.Generator().manual_seed(11)
    norm = random_norm(4096, g, torch.bfloat16)
    x, r = rows(4, 4096, g, torch.bfloat16), rows(4, 4096, g, torch.bfloat16)
    total, out = add_rms_norm(x.cuda(), r.cuda(), norm.weight.cuda(), norm.eps, True)
    ref_total, ref_out = norm.add(x, r)
    assert torch.equal(total.cpu(), ref_total)
    assert float((out.cpu() == ref_out).float().mean()) > 0.99
