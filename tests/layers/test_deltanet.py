import pytest
import torch

from flashmoe.layers.deltanet import delta_rule_chunked, delta_rule_recurrent, l2norm


def random_inputs(H=3, T=150, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(H, T, dk, generator=g)) * dk**-0.5
    k = l2norm(torch.randn(H, T, dk, generator=g))
    v = torch.randn(H, T, dv, generator=g)
    decay = -torch.rand(H, T, generator=g) * 2  # log decays <= 0
    beta = torch.rand(H, T, generator=g)
    state = torch.randn(H, dk, dv, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("T,chunk", [(150, 64), (64, 64), (5, 64), (37, 8)])
def test_chunked_form_equals_the_recurrence(T, chunk):
    q, k, v, g, beta, state = random_inputs(T=T)
    out_r, state_r = delta_rule_recurrent(q, k, v, g, beta, state.clone())
    out_c, state_c = delta_rule_chunked(q, k, v, g, beta, state.clone(), chunk=chunk)
    assert torch.allclose(out_c, out_r, rtol=1e-4, atol=1e-5)
    assert torch.allclose(state_c, state_r, rtol=1e-4, atol=1e-5)


def test_split_sequence_continues_from_the_state():
    q, k, v, g, beta, state = random_inputs(T=100)
    whole, end = delta_rule_chunked(q, k, v, g, beta, state)
    first, mid = delta_rule_chunked(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70], state)
    second, end2 = delta_rule_chunked(q[:, 70:], k[:, 70:], v[:, 70:], g[:, 70:], beta[:, 70:], mid)
    assert torch.allclose(torch.cat([first, second], 1), whole, rtol=1e-4, atol=1e-5)
    assert torch.allclose(end2, end, rtol=1e-4, atol=1e-5)
