import copy
from unittest import mock

import pytest
import torch

from flashmoe import kernels
from flashmoe.layers.deltanet import GatedDeltaNet


class State:
    def __init__(self, conv, recurrent):
        self.conv, self.recurrent = conv, recurrent


def random_layer_and_state(device, dtype, g: torch.Generator, gate: str = "silu") -> tuple[GatedDeltaNet, State]:
    layer = GatedDeltaNet(hidden=64, k_heads=2, v_heads=4, k_dim=16, v_dim=32, conv_kernel=4, eps=1e-6, output_gate=gate)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 1.0))
        layer.A_log.copy_(torch.rand(4, generator=g) * 2)
    layer = layer.to(device, dtype)
    conv_dim = 2 * 2 * 16 + 4 * 32
    return layer, State(torch.randn(3, conv_dim, generator=g).to(device, dtype), torch.randn(4, 16, 32, generator=g).to(device))


@pytest.mark.parametrize("dtype,tol,gate", [(torch.float32, 1e-5, "silu"), (torch.bfloat16, 2e-2, "silu"),
                                            (torch.float32, 1e-5, "sigmoid")])
def test_fused_step_matches_the_eager_step(device, dtype, tol, gate):
    """Qwen3.5's output gate silu(z), and Qwen4-Exp's sigmoid(z)."""
    g = torch.Generator().manual_seed(0)
    layer, state = random_layer_and_state(device, dtype, g, gate)
    eager_state = copy.deepcopy(state)
    with torch.no_grad():
        for step in range(3):  # several steps: the conv window and the state carry over
            x = torch.randn(1, 64, generator=g).to(device, dtype)
            fused = layer.decode_fused(x, state.conv, state.recurrent)
            eager = eager_forward(layer, x, eager_state)
            rel = float((fused.float() - eager.float()).norm() / eager.float().norm())
            assert rel < tol, (step, rel)
    assert float((state.conv.float() - eager_state.conv.float()).norm() / eager_state.conv.float().norm()) < tol
    assert float((state.recurrent - eager_state.recurrent).norm() / eager_state.recurrent.norm()) < tol


def test_the_step_reads_the_fused_projections(device):
    """With the four input projections fused into one matmul, the kernels get the same inputs."""
    g = torch.Generator().manual_seed(1)
    layer, state = random_layer_and_state(device, torch.float32, g)
    fused, fused_state = copy.deepcopy(layer), copy.deepcopy(state)
    fused.in_proj.fuse()
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(1, 64, generator=g).to(device)
            assert torch.allclose(fused.decode_fused(x, fused_state.conv, fused_state.recurrent),
                                  layer.decode_fused(x, state.conv, state.recurrent), rtol=1e-5, atol=1e-6)
    assert torch.allclose(fused_state.recurrent, state.recurrent, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused_projections", [False, True])
def test_a_batch_of_pooled_states_steps_in_one_launch_each_as_the_eager_step(device, fused_projections):
    """B sequences' states stacked as a StatePool keeps them (rows 0 .. B-1): the fused step of all
    of them at once, one idling (active 0: its window and state untouched), against the eager
    batched step on copies; with the projections fused, the kernels read column slices in place."""
    from flashmoe.layers.deltanet import fused_states
    from flashmoe.layers.state import LinearState

    g = torch.Generator().manual_seed(2)
    layer, _ = random_layer_and_state(device, torch.float32, g)
    if fused_projections:
        layer.in_proj.fuse()
    states = [LinearState(4, 2 * 2 * 16 + 4 * 32, 4, 16, 32, torch.float32, device) for _ in range(3)]
    for s in states:
        s.conv.copy_(torch.randn(s.conv.shape, generator=g))
        s.recurrent.copy_(torch.randn(s.recurrent.shape, generator=g))
    LinearState.stack_rows(states)
    assert fused_states(states) is not None and fused_states(states[1:]) is None  # rows 1, 2: not a bucket
    eager = [s.clone() for s in states]
    idle = states[1].clone()
    active = torch.tensor([1, 0, 1], device=device)
    with torch.no_grad():
        x = torch.randn(3, 64, generator=g).to(device)
        fused = layer.decode_fused(x, *fused_states(states), active)
        qkv, z, b, a = layer.in_proj(x)
        out = layer._steps(qkv, b, a, eager, active)
        want = layer.out_proj(layer.norm(out.to(x.dtype), z.view(3, 4, 32)).reshape(3, -1))
    for i in (0, 2):
        assert torch.allclose(fused[i], want[i], rtol=1e-4, atol=1e-5)
        assert torch.allclose(states[i].recurrent, eager[i].recurrent, rtol=1e-5, atol=1e-6)
        assert torch.allclose(states[i].conv, eager[i].conv)
    assert torch.equal(states[1].conv, idle.conv) and torch.equal(states[1].recurrent, idle.recurrent)


def eager_forward(layer, x, state):
    """The eager path, on a CPU copy when on a GPU (there, one-token calls dispatch to the kernels),
    with the CPU's numba step turned off."""
    if not x.is_cuda:
        with mock.patch.object(kernels, "use_cpu_kernels", lambda x: False):
            return layer(x, [state], [slice(0, x.shape[0])])
    cpu_state = State(state.conv.cpu(), state.recurrent.cpu())
    out = copy.deepcopy(layer).cpu()(x.cpu(), [cpu_state], [slice(0, x.shape[0])])
    state.conv.copy_(cpu_state.conv)
    state.recurrent.copy_(cpu_state.recurrent)
    return out.to(x.device)
