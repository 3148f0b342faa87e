import pytest
import torch

from flashmoe.kernels.rope import norm_rope
from flashmoe.layers.norm import RMSNorm
from flashmoe.layers.rotary import RotaryEmbedding, apply_rotary

from .conftest import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def case(T: int, heads: int, d: int, rot: int, dtype, seed: int, zero_centred: bool = True):
    """(q as a strided view inside a q_proj-like output [T, heads * 2d], cos, sin, norm): q_h is
    the first half of each head's 2d values, as in gated attention."""
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(T, heads * 2 * d, generator=g) * 2).to(dtype)
    q = proj.view(T, heads, 2 * d)[..., :d]
    cos, sin = RotaryEmbedding(rot, 10000.0)(torch.arange(5, 5 + T) * 7)
    norm = RMSNorm(d, eps=1e-6, zero_centred=zero_centred)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g) * 0.3 + (not zero_centred))
    return q, cos, sin, norm.to(dtype)


def run(q, cos, sin, norm, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, eager reference on the CPU)."""
    out = norm_rope(q.to(device), norm.weight.to(device), cos.to(device), sin.to(device), norm.eps, norm.zero_centred)
    return out, apply_rotary(norm(q), cos, sin)


# rot = d / 4 is the model's partial rotary; rot = d rotates the whole head.
@pytest.mark.parametrize("T,heads,d,rot", [(1, 4, 16, 4), (3, 4, 64, 16), (2, 2, 32, 32), (1, 32, 256, 64)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("zero_centred", [True, False], ids=["1+w", "w"])
def test_norm_rope_matches_norm_then_rotary(device, poison, T, heads, d, rot, dtype, tol, zero_centred):
    q, cos, sin, norm = case(T, heads, d, rot, dtype, seed=T * 100 + d + rot, zero_centred=zero_centred)
    out, ref = run(q, cos, sin, norm, device)
    assert out.shape == (T, heads, d) and out.dtype == dtype and out.is_contiguous()
    assert rel(out, ref) < tol * (1 if zero_centred else 2)  # the plain form rounds once more (before * w)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rotary_alone_without_a_norm(device, poison, dtype, tol):
    """Attention without q/k norm (GLM's default): the kernel rotates, the rest passes through."""
    q, cos, sin, _ = case(3, 4, 64, 32, dtype, seed=21)
    out = norm_rope(q.to(device), None, cos.to(device), sin.to(device), 0.0, False)
    assert rel(out, apply_rotary(q, cos, sin)) < tol

def test_contiguous_input(device):
    """k arrives as a plain [T, kv_heads, d] view (no gate interleaved)."""
    q, cos, sin, norm = case(2, 2, 32, 8, torch.float32, seed=3)
    k = q.contiguous()
    out, ref = run(k, cos, sin, norm, device)
    assert rel(out, ref) < 1e-6


@cuda
def test_bf16_rounds_where_the_eager_path_rounds():
    """At 16 bits the normed values (and the part past the rotary dims) are the eager ones exactly.
    In the rotary part eager rounds each product, then the sum; on the H200 18% of those values
    came out one rounding away (the GPU rounding the sum of the unrounded products once, as a
    fused or folded cast would; cause not pinned down), so there each value is bounded by the
    rounding of its two products."""
    q, cos, sin, norm = case(4, 32, 256, 64, torch.bfloat16, seed=9)
    out, ref = run(q, cos, sin, norm, "cuda")
    out, ref = out.cpu().float(), ref.float()
    n = norm(q).float()[..., :64]
    terms = (n * cos[:, None]).abs() + (torch.cat([-n[..., 32:], n[..., :32]], -1) * sin[:, None]).abs()
    assert torch.equal(out[..., 64:], ref[..., 64:])
    assert bool(((out[..., :64] - ref[..., :64]).abs() <= 2**-7 * terms).all())
