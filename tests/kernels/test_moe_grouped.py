import pytest
import torch

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.moe_grouped import MoeGrouped, moe_grouped_reference
from flashmoe.layers.mlp import Swiglu

from .test_moe_gemv import random_pool


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (2, 32), (16, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_the_reference_on_fresh_inputs(device, bits, group, dtype, tol):
    H, I = 64, 32
    layout = RecordLayout.build(H, I, bits, group)
    pool = random_pool(layout, 6, seed=bits * 7 + group)
    g = torch.Generator().manual_seed(bits)
    slots, counts = [4, 1, 5], [3, 20, 1]  # an expert with more rows than a tile, and with one row
    x = torch.randn(sum(counts), H, generator=g).to(dtype)
    ref = moe_grouped_reference(layout, x.float(), pool, slots, counts)
    y = MoeGrouped(layout, block_m=16, block_n=16, block_k=32)(x.to(device), pool.to(device), slots, counts)
    err = float((y.cpu() - ref).norm() / ref.norm())
    assert err < tol, err


@pytest.mark.parametrize("bits", [4, 16])
def test_biased_experts_with_the_clamped_swiglu(device, bits):
    """gpt-oss's experts as affine or 16-bit records: output biases (unweighted: prefill's rows are)
    and the clamped SwiGLU, at a limit the inputs cross."""
    act = Swiglu(1.702, 0.3)
    layout = RecordLayout.build(64, 32, bits, 32, with_bias=True)
    pool = random_pool(layout, 4, seed=bits + 5)
    slots, counts = [3, 0], [18, 2]
    x = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(4)) * 4
    ref = moe_grouped_reference(layout, x, pool, slots, counts, act)
    y = MoeGrouped(layout, block_m=16, block_n=16, block_k=32, act=act)(x.to(device), pool.to(device), slots, counts)
    assert float((y.cpu() - ref).norm() / ref.norm()) < 1e-5
