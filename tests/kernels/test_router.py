import pytest
import torch

from flashmoe.kernels.router import route
from flashmoe.layers.moe import SparseMoE

from .conftest import rel


def reference(logits: torch.Tensor, k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    moe = SparseMoE(8, logits.shape[1], k, 8, norm_topk)  # only its route() is used, on the CPU
    return moe.route(logits.cpu())


def distinct_logits(T: int, E: int, dtype, seed: int, stride: int) -> torch.Tensor:
    """[T, E] logits without ties in `dtype` (bf16 has 8 significant bits: random values tie often),
    as the first E columns of wider rows, as the router's slice of the fused in_proj output. A
    shuffled grid over [-8, 8) whose step keeps every value exact in bf16."""
    g = torch.Generator().manual_seed(seed)
    step = 16.0 / (1 << (E - 1).bit_length())
    rows = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float() * step - 8.0
    if dtype == torch.float32:
        rows = rows + torch.rand(T, E, generator=g) * (0.9 * step)  # off the grid, still ordered
    return torch.cat([rows, torch.randn(T, stride - E, generator=g)], dim=1).to(dtype)[:, :E]


# E = 40 is not a power of two (masked tail); (512, 10) is the 397B's router.
@pytest.mark.parametrize("T,E,k", [(1, 16, 2), (3, 64, 8), (2, 40, 5), (1, 512, 10)])
@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_route_matches_softmax_topk_renormalise(device, poison, T, E, k, norm_topk, dtype, tol):
    logits = distinct_logits(T, E, dtype, seed=T * 1000 + E + k, stride=E + 9)
    weights, ids = route(logits.to(device), k, norm_topk)
    ref_weights, ref_ids = reference(logits, k, norm_topk)
    assert weights.dtype == dtype and ids.dtype == torch.int64 and ids.shape == (T, k)
    assert torch.equal(ids.cpu(), ref_ids)  # the same experts, in the same (descending) order
    assert rel(weights, ref_weights) < tol


def test_random_fp32_logits_route_identically(device, poison):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 512, generator=g) * 2
    weights, ids = route(logits.to(device), 10, True)
    ref_weights, ref_ids = reference(logits, 10, True)
    assert torch.equal(ids.cpu(), ref_ids) and rel(weights, ref_weights) < 1e-6


def test_ties_go_to_the_lowest_ids(device):
    logits = torch.zeros(2, 32)
    logits[1, [3, 9, 20]] = 1.0
    weights, ids = route(logits.to(device), 4, True)
    assert ids.cpu().tolist() == [[0, 1, 2, 3], [3, 9, 20, 0]]
    assert torch.allclose(weights[0].cpu(), torch.full((4,), 0.25))
