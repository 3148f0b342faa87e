import time

import pytest
import torch

pytest.importorskip("numba")

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.cpu_expert_server import IDLE_CYCLES, MAX_EXPERTS, ExpertServer
from flashmoe.layers.mlp import Swiglu

from ..conftest import FAMILY_CONFIGS
from .test_cpu_experts import biased_pool, random_pool, reference, rel, tolerance


# Groups of 64, 32 and 16, each bit width; odd shares of rows (3 threads), more threads than the
# rows of some shares (empty shares) and shares that straddle two experts' rows.
@pytest.mark.parametrize("hidden,inter,bits,group", [(128, 64, 4, 64), (256, 96, 4, 32), (112, 48, 8, 16), (256, 64, 2, 64)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_answers_match_the_reference_on_fresh_records(hidden, inter, bits, group, threads):
    layout = RecordLayout.build(hidden, inter, bits, group)
    pool = random_pool(layout, 7, seed=hidden + bits + threads)
    g = torch.Generator().manual_seed(threads)
    server = ExpertServer(layout, pool, threads)
    server.start()
    try:
        for n in (1, 2, 5):
            slots = torch.randperm(7, generator=g)[:n].tolist()
            weights = (torch.rand(n, generator=g) - 0.3).tolist()  # one may be negative
            x = torch.randn(hidden, generator=g)
            assert rel(server.request(slots, weights, x), reference(layout, pool, slots, weights, x)) < tolerance(layout)
    finally:
        server.stop()
    assert not server.running


# gpt-oss's experts: MXFP4 as released, or converted to affine codes; biases; the clamped SwiGLU at
# tests/conftest.py's limit, which the random activations cross. H = 160 splits into odd shares of
# rows (53, 53, 54 on 3 threads), and 3 threads' shares of 2 or 5 experts' 96 activations straddle experts.
@pytest.mark.parametrize("scheme", ["mxfp4", "affine"])
@pytest.mark.parametrize("threads", [1, 3])
def test_biased_mxfp4_and_affine_experts_with_the_clamp_match_the_reference(scheme, threads):
    act = Swiglu(1.702, FAMILY_CONFIGS["gpt_oss"]["swiglu_limit"])
    layout = RecordLayout.build(160, 96, 4, 32, with_bias=True, scheme=scheme)
    pool = biased_pool(layout, 7, seed=threads)
    g = torch.Generator().manual_seed(threads)
    server = ExpertServer(layout, pool, threads, act)
    server.start()
    try:
        for n in (1, 2, 5):
            slots = torch.randperm(7, generator=g)[:n].tolist()
            weights = (torch.rand(n, generator=g) - 0.3).tolist()  # one may be negative
            x = torch.randn(160, generator=g)
            assert rel(server.request(slots, weights, x), reference(layout, pool, slots, weights, x, act)) < tolerance(layout)
    finally:
        server.stop()


def test_restarts_and_wakes_after_sleeping():
    """Barrier counts start again after stop/start, and a request after the threads went idle
    (IDLE_CYCLES of spinning, then sleeping in Python) is still answered."""
    layout = RecordLayout.build(128, 64, 4, 64)
    pool = random_pool(layout, 3, seed=9)
    server = ExpertServer(layout, pool, 2)
    x = torch.randn(128, generator=torch.Generator().manual_seed(1))
    want = reference(layout, pool, [2, 0], [0.7, 0.3], x)
    for _ in range(2):
        server.start()
        assert rel(server.request([2, 0], [0.7, 0.3], x), want) < tolerance(layout)
        time.sleep(IDLE_CYCLES / 1e9 + 0.2)  # TSC ticks at 1-4 GHz: idle by now
        assert rel(server.request([2, 0], [0.7, 0.3], x), want) < tolerance(layout)
        server.stop()


def test_refuses_bad_requests_and_layouts():
    layout = RecordLayout.build(128, 64, 4, 64)
    pool = random_pool(layout, 2, seed=0)
    server = ExpertServer(layout, pool, 1)
    with pytest.raises(RuntimeError, match="start"):
        server.request([0], [1.0], torch.zeros(128))
    server.start()
    try:
        with pytest.raises(ValueError, match=f"1 to {MAX_EXPERTS} experts"):
            server.request([], [], torch.zeros(128))
    finally:
        server.stop()
    with pytest.raises(ValueError, match="not 16-bit records"):
        ExpertServer(RecordLayout.build(128, 64, 16, 64), pool, 1)
    with pytest.raises(ValueError, match="host tier's uint8"):
        ExpertServer(layout, pool[:, :100], 1)


def test_phase_times_count_every_request():
    layout = RecordLayout.build(128, 64, 4, 64)
    pool = random_pool(layout, 3, seed=4)
    server = ExpertServer(layout, pool, 2)
    server.start()
    try:
        server.request([0], [1.0], torch.randn(128))
        before = server.phase_counters()
        for _ in range(3):
            server.request([1, 2], [0.5, 0.5], torch.randn(128))
        after = server.phase_counters()
    finally:
        server.stop()
    assert before[:, -1].tolist() == [1, 1] and after[:, -1].tolist() == [4, 4]
    seconds = ExpertServer.phase_seconds(before, after)
    assert seconds.shape == (2, 3) and (seconds >= 0).all() and seconds[:, 0].min() > 0 and seconds.max() < 1.0
