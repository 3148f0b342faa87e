"""The benchmark's own logic at a tiny shape on the CPU (the GPU path's kernels in Triton's interpreter)."""

import numpy as np
import pytest
import torch

from flashmoe.bench import decode_rows
from flashmoe.bench.presets import PRESETS, preset_args
from flashmoe.bench.probes import Bandwidths
from flashmoe.bench.scenarios import run_decode, run_prefill, run_replayed_decode
from flashmoe.bench.synthesis import synthesize
from flashmoe.bench.tiers import Tiers, place_tiers, plan_tiers, slice_engine
from flashmoe.bench import synthesis
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import RecordLayout
from flashmoe.models import args_from_dict

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the kernels run in Triton's interpreter

TINY = dict(
    PRESETS["qwen3.5-397b-a17b"], vocab_size=1024, hidden_size=64, num_attention_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    num_hidden_layers=2, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
)


LAYOUT = RecordLayout.build(64, 32, 4, 32)  # TINY's experts at 4 bits


def test_tiers_follow_the_spec_for_the_397b():
    full = preset_args("qwen3.5-397b-a17b")
    layout = RecordLayout.build(4096, 1024, 4, 64)
    h200 = plan_tiers(full, layout, 139 << 30, 128 << 30)
    assert 0.55 <= h200.gpu_fraction <= 0.6 and h200.disk_fraction == 0  # "about 55-60% GPU, rest host, no disk"
    h100 = plan_tiers(full, layout, 80 << 30, 125 << 30)
    assert 0.15 <= h100.disk_fraction <= 0.3  # "spills ~20% to disk"
    h100_2bit = plan_tiers(full, RecordLayout.build(4096, 1024, 2, 64), 80 << 30, 125 << 30)
    assert h100_2bit.disk_fraction == 0  # "fits"


@pytest.fixture(scope="module")
def tiny_bench_model(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("bench") / "m", TINY, bits=4, group_size=32)


def test_synthesized_model_runs_with_placed_tiers(tiny_bench_model):
    out = tiny_bench_model
    assert synthesize(out, TINY, bits=4, group_size=32) == out  # reused, not rewritten
    layout = LAYOUT
    engine = Engine(out, EngineConfig(device=DEVICE, dtype="float32", cache_policy="static", host_mem=(2 * 6 + 2) * layout.record_size, prefetch=True, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=2 * 5 * layout.record_size, policy="static")
    engine.set_prefetch(False)  # the plain row first, as bench --prefetch runs them
    tiers = Tiers(5, 6, 16, 5 / 16, 6 / 16, 5 / 16, "")
    place_tiers(engine, tiers)
    r = run_decode(engine, 8, 4, layers_full=4, bw=Bandwidths(1e10, 1e11, 1e9), repeats=1)
    assert r.tokens == 3 and r.tps > 0 and (r.layers_in_slice, r.layers_full) == (2, 4)
    # the extrapolation: what lies outside the layers, then each of the full model's layers at the slice's rate
    assert 1e3 / r.tps_extrapolated == pytest.approx(r.ms_outside_layers + 4 * r.ms_per_layer)
    assert 0 < r.gpu_hit_rate < 1 and 0 <= r.host_hit_rate < 1
    assert r.bytes_per_token["pcie"] > 0 and r.bytes_per_token["disk"] > 0
    dense = {"dense (graph)"} if DEVICE == "cuda" else {"mixer", "routing"}  # on a GPU the dense part is a graph
    assert set(r.breakdown_ms_per_layer) >= dense | {"expert_io", "expert_compute"}
    engine.set_prefetch(True)
    place_tiers(engine, tiers)
    f = run_decode(engine, 8, 4, layers_full=4, bw=Bandwidths(1e10, 1e11, 1e9), repeats=1)
    assert f.prefetch and not r.prefetch and 0 < f.prefetch_accuracy <= 1 and f.prefetch_wasted_bytes_per_token >= 0
    engine.set_prefetch(False)
    p = run_prefill(engine, 12, layers_full=4)
    assert p["prompt_tokens"] == 12 and p["tps"] > 0


def test_resident_rows_read_host_experts_in_place(tiny_bench_model):
    """With no disk tier the bench can run every expert where it lies: no copies, the host tier's
    share counted as PCIe reads, the same placement as the copying rows."""
    rs = LAYOUT.record_size
    engine = Engine(tiny_bench_model, EngineConfig(device=DEVICE, dtype="float32", cache_policy="static", host_mem=(2 * 11 + 2) * rs, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=2 * 5 * rs, policy="static")
    tiers = Tiers(5, 11, 16, 5 / 16, 11 / 16, 0.0, "")
    place_tiers(engine, tiers, resident=True)
    r = run_decode(engine, 8, 4, layers_full=4, bw=Bandwidths(1e10, 1e11, 1e9), repeats=1)
    assert r.resident and r.tokens == 3 and r.host_hit_rate == 1.0 and 0 < r.gpu_hit_rate < 1
    assert r.bytes_per_token["disk"] == 0 and r.bytes_per_token["pcie"] == pytest.approx((1 - r.gpu_hit_rate) * 2 * 2 * rs)
    place_tiers(engine, tiers)  # and back to copying
    assert not engine.resident and engine.gpu_tier.resident is None


def test_adaptive_replay_row_learns_during_its_warmup_and_leaves_the_placement_as_found(tiny_bench_model, monkeypatch):
    """A shuffled replay's adaptive row: the placement swaps experts during the untimed warm-up, the
    row says so, its PCIe bytes count both records of each timed swap, and the next row's
    place_tiers finds the first placement again."""
    import functools

    from flashmoe.experts import resident
    from flashmoe.analysis.locality import StreamGenerator

    monkeypatch.setattr(resident, "AdaptivePlacement", functools.partial(resident.AdaptivePlacement, confidence=0.5))
    rs = LAYOUT.record_size
    engine = Engine(tiny_bench_model, EngineConfig(device=DEVICE, dtype="float32", cache_policy="static", host_mem=(2 * 11 + 2) * rs, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=2 * 5 * rs, policy="static")
    tiers = Tiers(5, 11, 16, 5 / 16, 11 / 16, 0.0, "")
    shares = np.tile(np.array([8.0] * 4 + [1.0] * 12) / 44, (2, 1))  # 4 of 16 experts draw 73% of the load
    place_tiers(engine, tiers, resident=True, adaptive=True)
    r = run_replayed_decode(engine, StreamGenerator(shares, 2), 8, 4, layers_full=4, bw=Bandwidths(1e10, 1e11, 1e9),
                              repeats=1, shuffled=True, warmup=10)
    assert r.routing == "trace replay shuffled" and r.resident and r.adaptive
    assert r.warmup_tokens == 10 and r.warmup_swaps > 0
    reads = r.bytes_per_token["pcie"] / rs - r.swaps_per_token * 2  # what the kernels read in place, per token
    assert reads == pytest.approx((1 - r.gpu_hit_rate) * 2 * 2)  # 2 layers x k = 2, the rest GPU hits
    place_tiers(engine, tiers, resident=True)
    assert not engine.adaptive
    assert set(engine.gpu_tier.slots.slot_of) == {(layer, e) for layer in range(2) for e in range(5)}


def test_synthesis_that_cannot_fit_the_disk_is_refused_up_front(tmp_path, monkeypatch):
    """Named: the space needed and free, and the models synthesized earlier beside it to delete;
    nothing is written."""
    synthesize(tmp_path / "old", TINY, bits=4, group_size=32)
    monkeypatch.setattr(synthesis.shutil, "disk_usage", lambda p: shutil_usage(free=1 << 10))
    with pytest.raises(RuntimeError, match=r"needs .* GiB but .* free there; delete models synthesized earlier \(.*old"):
        synthesize(tmp_path / "new", TINY, bits=8, group_size=32)
    assert not (tmp_path / "new").exists()
    assert synthesize(tmp_path / "old", TINY, bits=4, group_size=32) == tmp_path / "old"  # a reuse needs no space


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=free, used=0, free=free)


def test_decode_rows_put_the_cpu_share_where_it_can_win():
    plain = decode_rows([2], prefetch=True, resident=False, replay=False)
    assert plain == [("uniform", False, 0, False, False), ("uniform", True, 0, False, False),
                     ("uniform", False, 2, False, False), ("uniform", True, 2, False, False)]
    # with resident rows the copying path runs without the share, the resident rows with and without
    preloaded = decode_rows([2], prefetch=False, resident=True, replay=True)
    assert preloaded == [("uniform", False, 0, False, False), ("uniform", False, 0, True, False), ("uniform", False, 2, True, False),
                         ("trace replay", False, 0, False, False), ("trace replay", False, 0, True, False),
                         ("trace replay", False, 2, True, False)]
    # adaptive rows: uniform (the cost where there is nothing to learn), the shuffled replay static and adaptive
    adaptive = decode_rows([2], prefetch=False, resident=True, replay=True, adaptive=True)
    assert adaptive == preloaded[:3] + [("uniform", False, 0, True, True)] + preloaded[3:] + [
        ("trace replay shuffled", False, 0, True, False), ("trace replay shuffled", False, 0, True, True),
        ("trace replay shuffled", False, 2, True, True)]
    assert decode_rows([2], prefetch=False, resident=False, replay=True, adaptive=True) == decode_rows(
        [2], prefetch=False, resident=False, replay=True)  # adaptive placement is resident decode's


def test_slice_engine_budgets_what_place_tiers_fills(monkeypatch):
    """The bench's engine gets per-MoE-layer budgets for the planned tiers: the GPU and host sizes
    the CPU tests above fill with place_tiers (the host's plus one layer's k staging slots)."""
    made = {}
    monkeypatch.setattr("flashmoe.engine.Engine", lambda model, config: made.update(config=config, model=model) or "engine")
    rs = LAYOUT.record_size
    tiers = Tiers(5, 11, 16, 5 / 16, 11 / 16, 0.0, "")
    assert slice_engine("m", args_from_dict(TINY), LAYOUT, tiers, k_max=2, dense_bits=8) == "engine"
    c = made["config"]
    assert c.gpu_mem == 2 * 5 * rs and c.host_mem == (2 * 11 + 2) * rs
    assert c.device == "cuda" and c.k == 2 and c.dense_bits == 8 and c.cache_policy == "static"
