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

from .test_cpu_experts import random_pool, reference, rel, tolerance

E, K = 8, 2
# The tiny test models' records (tests/conftest.py packed4) and the demo model's, whose groups of 64
# the kernels compute by integer dot products where the host has them: each a variant the suite compiles anyway.
LAYOUTS = [RecordLayout.build(64, 32, 4, 32), RecordLayout.build(128, 64, 4, 64)]


def eager_layer(layout, x, mixer_out, norm_weight, eps, w_in, w_down, gated, norm_topk, pool, slot_of):
    """The eager path's arithmetic in PyTorch for tokens x [T, H]: the residual add, the
    zero-centred RMSNorm, the fused projections, softmax top-k, the shared expert and its gate, the
    routed experts' definition -> (the layer's output, r + the shared expert alone, h, ids, weights)."""
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
    routed = torch.stack([reference(layout, pool, [int(slot_of[e]) for e in ids[t]], weights[t].tolist(), h[t])
                          for t in range(x.shape[0])])
    return out + routed, out, h, ids, weights


@pytest.mark.parametrize("layout", LAYOUTS, ids=["group32", "group64"])
@pytest.mark.parametrize("shared,gated,norm_topk", [(32, True, True), (0, False, False)])
def test_the_moe_step_matches_the_eager_layer(layout, shared, gated, norm_topk):
    """Qwen3.5's layer (a sigmoid-gated shared expert, renormalised top-k) and Qwen3's without a
    shared expert or renormalisation, on fresh random weights, records and inputs: one token, and a
    batch's five (experts that several of them chose read once for all); then a chosen expert not
    cached, and more chosen experts than the call may compute: the call says so, with the rest of
    the layer done (r + the shared expert, the routing, the experts' input)."""
    H, I = layout.hidden_size, layout.intermediate_size
    g = torch.Generator().manual_seed(shared + gated)
    norm_weight, eps = torch.randn(H, generator=g) * 0.2, 1e-6
    w_in = (torch.randn(E + (gated + 2 * shared), H, generator=g) / H**0.5).bfloat16()
    w_down = (torch.randn(H, shared, generator=g) / max(shared, 1) ** 0.5).bfloat16()
    pool = random_pool(layout, 10, seed=3)
    slot_of = torch.randperm(10, generator=g)[:E].numpy().astype(np.int64)
    p8 = pool.numpy()
    kernel = moe_kernel(layout, SILU)
    constants = (norm_weight.numpy(), np.float32(eps), True, w_in.view(torch.uint16).numpy(),
                 w_down.view(torch.uint16).numpy(), gated, norm_topk)
    records = (p8, p8.view(np.uint16), _offsets(layout), I, _half_pow2())

    def run(x, mixer_out, slots, most=E):
        T = x.shape[0]
        outputs = np.empty((T, H), np.float32), np.empty((T, K), np.int64), np.empty((T, K), np.float32), np.empty((T, H), np.float32)
        done = kernel(x.numpy(), mixer_out.numpy(), *constants, slots, *records, most, *outputs)
        return done, *(torch.from_numpy(a) for a in outputs)

    for T in (1, 1, 5):
        x, mixer_out = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
        want, want_shared, want_h, want_ids, want_weights = eager_layer(layout, x, mixer_out, norm_weight, eps, w_in, w_down, gated,
                                                                        norm_topk, pool, slot_of)
        done, h, ids, weights, out = run(x, mixer_out, slot_of)
        assert done == len(set(want_ids.flatten().tolist())) and ids.tolist() == want_ids.tolist()  # experts computed
        assert rel(out, want) < tolerance(layout) and rel(weights, want_weights) < 1e-6 and rel(h, want_h) < 1e-6  # measured ~1e-7
    assert len(set(ids.flatten().tolist())) < 5 * K  # some expert chosen by several tokens
    missing = slot_of.copy()
    missing[ids[3, 1]] = -1
    for slots, most in ((missing, E), (slot_of, len(set(ids.flatten().tolist())) - 1)):
        done, h, ids, weights, out = run(x, mixer_out, slots, most)
        assert done == 0 and ids.tolist() == want_ids.tolist() and rel(out, want_shared) < 1e-6 and rel(h, want_h) < 1e-6
