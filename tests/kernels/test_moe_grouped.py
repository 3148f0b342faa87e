import pytest
import torch

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.moe_grouped import MoeGrouped, moe_grouped_reference

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
