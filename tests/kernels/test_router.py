import pytest
import torch

from flashmoe.kernels.router import route
from flashmoe.moe.routing import Routing, route_reference

from .conftest import rel

SOFTMAX, RENORMALISED = Routing(norm_topk=False), Routing()


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
@pytest.mark.parametrize("rule", [SOFTMAX, RENORMALISED], ids=["softmax", "renormalised"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_route_matches_softmax_topk_renormalise(device, poison, T, E, k, rule, dtype, tol):
    logits = distinct_logits(T, E, dtype, seed=T * 1000 + E + k, stride=E + 9)
    weights, ids = route(logits.to(device), k, rule)
    ref_weights, ref_ids = route_reference(logits, k, rule)
    assert weights.dtype == dtype and ids.dtype == torch.int64 and ids.shape == (T, k)
    assert torch.equal(ids.cpu(), ref_ids)  # the same experts, in the same (descending) order
    assert rel(weights, ref_weights) < tol


# MiniMax (bias, no groups), GLM-4.5's 160 experts (not a power of two), DeepSeek-style groups
# (256 experts, 8 groups, 4 kept; scaling), and a tiny grouped case.
@pytest.mark.parametrize("T,E,k,groups,kept,scaling", [
    (2, 64, 8, 1, 1, 1.0), (1, 160, 8, 1, 1, 2.5), (3, 256, 8, 8, 4, 2.5), (2, 16, 2, 4, 2, 1.0),
])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_sigmoid_routing_with_bias_and_groups_matches_the_reference(device, poison, T, E, k, groups, kept, scaling, norm_topk):
    """Choices made on biased scores (some negative), weights from the unbiased ones: on fresh random
    fp32 logits and biases, the same experts in the same order, the same weights."""
    g = torch.Generator().manual_seed(T * 7 + E + groups)
    logits, bias = torch.randn(T, E, generator=g) * 3, torch.randn(E, generator=g) * 0.5 - 0.6
    rule = Routing("sigmoid", norm_topk, correction_bias=True, n_group=groups, topk_group=kept, scaling=scaling)
    weights, ids = route(logits.to(device), k, rule, bias.to(device))
    ref_weights, ref_ids = route_reference(logits, k, rule, bias)
    assert torch.equal(ids.cpu(), ref_ids)
    assert rel(weights, ref_weights) < 1e-6
    if groups > 1:  # every chosen expert lies in one of the `kept` groups
        assert all(len(set((row // (E // groups)).tolist())) <= kept for row in ids.cpu())


def test_random_fp32_logits_route_identically(device, poison):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 512, generator=g) * 2
    weights, ids = route(logits.to(device), 10, RENORMALISED)
    ref_weights, ref_ids = route_reference(logits, 10, RENORMALISED)
    assert torch.equal(ids.cpu(), ref_ids) and rel(weights, ref_weights) < 1e-6


def test_ties_go_to_the_lowest_ids(device):
    logits = torch.zeros(2, 32)
    logits[1, [3, 9, 20]] = 1.0
    weights, ids = route(logits.to(device), 4, RENORMALISED)
    assert ids.cpu().tolist() == [[0, 1, 2, 3], [3, 9, 20, 0]]
    assert torch.allclose(weights[0].cpu(), torch.full((4,), 0.25))


def test_a_bias_must_come_with_the_rule_that_uses_it(device):
    with pytest.raises(ValueError, match="correction bias"):
        route(torch.zeros(1, 8, device=device), 2, Routing("sigmoid", correction_bias=True))
