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


def test_an_idle_sequence_of_a_batched_step_keeps_its_state():
    """A pooled decode graph's idle slot (active 0) computes a throwaway token: its conv window and
    recurrent state stay exactly as they were, and the running sequences step as without the mask."""
    from flashmoe.layers.deltanet import GatedDeltaNet

    torch.manual_seed(0)
    layer = GatedDeltaNet(hidden=32, k_heads=2, v_heads=4, k_dim=8, v_dim=8, conv_kernel=4, eps=1e-6)
    for p in (layer.A_log, layer.dt_bias):
        p.data.normal_()
    states = [layer.new_state(torch.float32, "cpu") for _ in range(3)]
    for state in states:
        state.conv.normal_()
        state.recurrent.normal_()
    twins, before = [s.clone() for s in states], states[1].clone()
    x, slices = torch.randn(3, 32), [slice(i, i + 1) for i in range(3)]
    masked = layer(x, states, slices, active=torch.tensor([1, 0, 1]))
    plain = layer(x, twins, slices)
    assert torch.equal(states[1].conv, before.conv) and torch.equal(states[1].recurrent, before.recurrent)
    assert not torch.equal(twins[1].recurrent, before.recurrent)  # unmasked, the step moves it
    for i in (0, 2):
        assert torch.equal(masked[i], plain[i])
        assert torch.equal(states[i].conv, twins[i].conv) and torch.equal(states[i].recurrent, twins[i].recurrent)


@pytest.mark.parametrize("lengths", [[5, 70, 2], [3, 1, 4]], ids=["chunked", "short"])
def test_packed_prompts_run_the_rule_once_and_give_what_each_gives_alone(lengths, monkeypatch):
    """A packed prefill (several sequences' prompts in one forward): the delta rule runs once for
    all of them, each padded at its end, and every output, conv window and recurrent state equals
    that sequence's prompt run alone, from states already under way."""
    import flashmoe.layers.deltanet as deltanet

    torch.manual_seed(1)
    layer = deltanet.GatedDeltaNet(hidden=32, k_heads=2, v_heads=4, k_dim=8, v_dim=8, conv_kernel=4, eps=1e-6)
    for p in (layer.A_log, layer.dt_bias):
        p.data.normal_()
    states = [layer.new_state(torch.float32, "cpu") for _ in lengths]
    for state in states:
        state.conv.normal_()
        state.recurrent.normal_()
    twins = [s.clone() for s in states]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    slices = [slice(s, s + n) for s, n in zip(starts, lengths)]
    x = torch.randn(sum(lengths), 32)
    calls = []
    for name in ("delta_rule_chunked", "delta_rule_recurrent"):
        monkeypatch.setattr(deltanet, name, lambda *a, f=getattr(deltanet, name): calls.append(1) or f(*a))
    with torch.no_grad():
        packed = layer(x, states, slices)
    assert len(calls) == 1
    for sl, state, twin in zip(slices, states, twins):
        with torch.no_grad():
            alone = layer(x[sl], [twin], [slice(0, sl.stop - sl.start)])
        assert torch.allclose(packed[sl], alone, rtol=1e-5, atol=1e-6)
        assert torch.allclose(state.conv, twin.conv, rtol=1e-5, atol=1e-6)  # the projections of 77 rows or 5
        assert torch.allclose(state.recurrent, twin.recurrent, rtol=1e-5, atol=1e-6)
