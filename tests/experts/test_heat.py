import shutil

import numpy as np
import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.experts.heat import HEAT_FILE, hottest_first, read_heat, write_heat
from flashmoe.formats.packed import Manifest
from flashmoe.runtime.sampling import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_heat_round_trips_and_replaces_the_file_whole(tmp_path):
    heat = np.random.default_rng(0).random((3, 8)) * 100
    write_heat(tmp_path, heat)
    got, note = read_heat(tmp_path, (3, 8))
    assert np.allclose(got, heat.astype(np.float32)) and HEAT_FILE in note
    write_heat(tmp_path, heat * 2)
    assert np.allclose(read_heat(tmp_path, (3, 8))[0], (heat * 2).astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == [HEAT_FILE]  # no temporary left behind


def test_heat_that_does_not_fit_is_ignored_with_a_note(tmp_path):
    assert read_heat(tmp_path, (3, 8)) == (None, "")  # no file: nothing to say
    write_heat(tmp_path, np.ones((3, 8)))
    got, note = read_heat(tmp_path, (4, 8))
    assert got is None and "this model needs [4, 8]" in note and "delete it" in note
    write_heat(tmp_path, -np.ones((3, 8)))
    assert read_heat(tmp_path, (3, 8))[0] is None
    (tmp_path / HEAT_FILE).write_bytes(b"not a safetensors file")
    got, note = read_heat(tmp_path, (3, 8))
    assert got is None and "unreadable" in note


def test_hottest_first_orders_by_heat_then_id():
    heat = np.array([[0.0, 5.0, 1.0, 5.0]])
    assert hottest_first(heat, 0, 4) == [1, 3, 2, 0]
    assert hottest_first(None, 0, 4) == [0, 1, 2, 3]


@pytest.fixture
def model_copy(packed4, tmp_path):
    """A copy of the packed model: these tests write beside it."""
    return shutil.copytree(packed4, tmp_path / "model")


def preloaded(model, record: int, **options) -> Engine:
    """2 of each layer's 8 experts on the GPU, the rest in RAM, adaptive (the mix policy)."""
    return Engine(model, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record, gpu_mem=8 * record,
                                      gpu_path_on_cpu=DEVICE == "cpu", preload=True, **options))


def test_a_preload_starts_from_the_saved_heat_and_close_saves_what_decode_added(model_copy):
    pytest.importorskip("triton")
    record = Manifest.load(model_copy).layout.record_size
    saved = np.zeros((4, 8))
    for layer in range(4):
        saved[layer, [7 - layer, 3]] = [50.0, 40.0]  # each layer's two hottest
    write_heat(model_copy, saved)
    engine = preloaded(model_copy, record)
    tier = engine.gpu_tier
    assert engine.adaptive and any(HEAT_FILE in c for c in engine.choices)
    for layer in range(4):
        assert {e for (lay, e) in tier.slots.slot_of if lay == layer} == {7 - layer, 3}
    assert np.array_equal(tier.resident.placement.heat, saved)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    gen = engine.generate([1, 2, 3], params)
    for _ in gen:
        pass
    engine.close()
    after, _ = read_heat(model_copy, (4, 8))
    # the saved heat, decayed by a few steps of a 1024-step half-life, plus every lookup the device
    # counted: the prompt's 3 tokens' and the 4 decode steps', k of each of 4 layers
    counted = (3 + gen.stats.decode_tokens) * 4 * engine.top_k
    assert after.sum() - saved.sum() == pytest.approx(counted, abs=0.01 * saved.sum())
    assert after.sum() > saved.sum() and (after >= saved * 0.99).all()


def test_no_placement_heat_neither_reads_nor_saves_and_a_failed_save_loses_nothing(model_copy, monkeypatch):
    pytest.importorskip("triton")
    record = Manifest.load(model_copy).layout.record_size
    write_heat(model_copy, np.full((4, 8), 1.0) + np.eye(4, 8)[::-1] * 100)
    before = (model_copy / HEAT_FILE).read_bytes()
    engine = preloaded(model_copy, record, placement_heat=False)
    assert {e for (_, e) in engine.gpu_tier.slots.slot_of} == {0, 1}  # experts [0, 2) of each layer
    for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)):
        pass
    engine.close()
    assert (model_copy / HEAT_FILE).read_bytes() == before

    # with it, a save that fails (a read-only model directory) warns, keeps the old file, raises nothing
    engine = preloaded(model_copy, record)
    for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)):
        pass

    def read_only(*_):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("flashmoe.engine.write_heat", read_only)
    with pytest.warns(UserWarning, match="placement heat not saved .* --no-placement-heat"):
        engine.close()
    assert (model_copy / HEAT_FILE).read_bytes() == before
