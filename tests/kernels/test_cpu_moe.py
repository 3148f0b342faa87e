import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.cpu_experts import _half_pow2, _offsets
from flashmoe.kernels.cpu_moe import moe_kernel
from flashmoe.layers.mlp import SILU
from flashmoe.moe.routing import Routing, route_reference

from .test_cpu_experts import random_pool, reference, rel

# the tiny test models' records (tests/conftest.py packed4): one compiled variant for the whole suite
H, I, E, K = 64, 32, 8, 2
LAYOUT = RecordLayout.build(H, I, 4, 32)


def eager_layer(x, mixer_out, norm_weight, eps, w_in, w_down, gated, norm_topk, pool, slot_of):
    """The eager path's arithmetic in PyTorch: the residual add, the zero-centred RMSNorm, the fused
    projections, softmax top-k, the shared expert and its gate, the routed experts' definition."""
    r = x + mixer_out
    h = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * (1 + norm_weight)
    proj = h @ w_in.float().t()
    weights, ids = route_reference(proj[:, :E], K, Routing(norm_topk=norm_topk))
    out = r
    if w_down.shape[1]:
        shared, first = w_down.shape[1], E + 1 if gated else E
        gate, up = proj[:, first : first + shared], proj[:, first + shared :]
        y = (F.silu(gate) * up) @ w_down.float().t()
        out = out + (torch.sigmoid(proj[:, E : E + 1]) * y if gated else y)
    slots = [int(slot_of[e]) for e in ids[0]]
    return out + reference(LAYOUT, pool, slots, weights[0].tolist(), h[0]), ids[0]


@pytest.mark.parametrize("shared,gated,norm_topk", [(32, True, True), (0, False, False)])
def test_the_moe_step_matches_the_eager_layer(shared, gated, norm_topk):
    """Qwen3.5's layer (a sigmoid-gated shared expert, renormalised top-k) and Qwen3's without a
    shared expert or renormalisation, on fresh random weights, records and inputs; then a chosen
    expert not cached: the call says so and leaves its output alone."""
    g = torch.Generator().manual_seed(shared + gated)
    norm_weight, eps = torch.randn(H, generator=g) * 0.2, 1e-6
    w_in = (torch.randn(E + (gated + 2 * shared), H, generator=g) / H**0.5).bfloat16()
    w_down = (torch.randn(H, shared, generator=g) / max(shared, 1) ** 0.5).bfloat16()
    pool = random_pool(LAYOUT, 10, seed=3)
    slot_of = torch.randperm(10, generator=g)[:E].numpy().astype(np.int64)
    p8 = pool.numpy()
    kernel = moe_kernel(LAYOUT, SILU)
    constants = (norm_weight.numpy(), np.float32(eps), True, w_in.view(torch.uint16).numpy(),
                 w_down.view(torch.uint16).numpy(), gated, norm_topk)
    records = (p8, p8.view(np.uint16), _offsets(LAYOUT), I, _half_pow2())
    for _ in range(3):
        x, mixer_out = torch.randn(1, H, generator=g), torch.randn(1, H, generator=g)
        ids, out = np.empty(K, np.int64), np.empty((1, H), np.float32)
        assert kernel(x.numpy(), mixer_out.numpy(), *constants, slot_of, *records, ids, out)
        want, want_ids = eager_layer(x, mixer_out, norm_weight, eps, w_in, w_down, gated, norm_topk, pool, slot_of)
        assert ids.tolist() == want_ids.tolist()
        assert rel(torch.from_numpy(out), want) < 1e-5  # measured ~1e-7
    missing = slot_of.copy()
    missing[ids[1]] = -1
    out[:] = 7.0
    assert not kernel(x.numpy(), mixer_out.numpy(), *constants, missing, *records, ids, out)
    assert (out == 7.0).all()
