import copy

import pytest
import torch

pytest.importorskip("numba")

from flashmoe import kernels

from .test_deltanet_step import eager_forward, random_layer_and_state


def test_the_cpu_deltanet_step_matches_the_eager_step():
    """The numba step against the PyTorch path on fresh random weights and state, several tokens
    (the conv window and the recurrent state carry over), through the layer's own dispatch."""
    g = torch.Generator().manual_seed(2)
    layer, state = random_layer_and_state("cpu", torch.float32, g)
    layer.in_proj.fuse()  # as the engine runs it
    eager_state = copy.deepcopy(state)
    x = torch.randn(1, 64, generator=g)
    assert kernels.use_cpu_kernels(x) and not kernels.use_cpu_kernels(x.bfloat16())
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(1, 64, generator=g)
            out = layer(x, [state], [slice(0, 1)])
            ref = eager_forward(layer, x, eager_state)
            assert float((out - ref).norm() / ref.norm()) < 1e-5, step
    assert torch.allclose(state.conv, eager_state.conv)  # shifted alike: exact copies
    assert float((state.recurrent - eager_state.recurrent).norm() / eager_state.recurrent.norm()) < 1e-5
