"""StatePool: sequence slots allocated once (batched decode on the GPU); on the CPU here, where the
engine runs the same states eagerly."""

import gc

import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.layers.state import KVCache, LinearState, StatePool


@pytest.fixture(scope="module")
def engines(packed16):
    return Engine(packed16, EngineConfig(dtype="float32", threads=1)), Engine(packed16, EngineConfig(dtype="float32", threads=1))


@pytest.fixture
def plain(engines):
    return engines[1]


@pytest.fixture
def pooled(engines):
    """An engine whose new states come from a fresh pool of three slots (the GPU path's decode_slots)."""
    engine = engines[0]
    engine.pool = StatePool(lambda: engine.model.new_state(engine.dtype, engine.device), 3, capacity=16)
    yield engine
    engine.pool = None


def test_sequences_take_the_lowest_free_slot_and_give_it_back_when_released_or_dropped(pooled):
    pool = pooled.pool
    a, b, c = (pooled.new_state() for _ in range(3))
    assert [a.slot, b.slot, c.slot] == [0, 1, 2] and pool.free == 0
    assert pooled.new_state().slot is None  # every slot taken: buffers of its own
    pooled.release(b)
    assert b.slot is None and b.layers == [] and pool.holders(3) == [a, None, c]
    del a
    gc.collect()
    assert pool.free == 2
    d = pooled.new_state()
    assert d.slot == 0
    b.leave_slot()  # released already: giving back twice frees nothing twice
    assert pool.free == 1


def test_a_slot_is_reset_for_its_next_sequence_and_its_caches_reserved(pooled):
    state = pooled.new_state()
    pooled.forward([5, 6, 7, 8], state)
    layers = state.layers
    assert any(isinstance(c, KVCache) and c.length == 4 for c in layers)
    assert any(isinstance(c, LinearState) and c.recurrent.abs().sum() > 0 for c in layers)
    del state
    gc.collect()
    again = pooled.new_state()
    assert again.layers is layers and again.position == 0  # the same buffers, no allocation
    assert all(c.length == 0 and c.k.shape[0] >= 17 for c in layers if isinstance(c, KVCache))  # 16 + scratch
    assert all(not c.conv.any() and not c.recurrent.any() for c in layers if isinstance(c, LinearState))


def test_pooled_states_decode_as_states_of_their_own(pooled, plain):
    mine, theirs = pooled.new_state(), plain.new_state()
    assert mine.slot is not None
    got, want = pooled.forward([5, 6, 7], mine), plain.forward([5, 6, 7], theirs)
    for token in (9, 10):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        got, want = pooled.forward([token], mine), plain.forward([token], theirs)


def test_a_cached_prefix_is_copied_into_a_slot_and_a_preempted_sequence_rebuilt_in_one(pooled):
    outside = pooled.model.new_state(pooled.dtype, pooled.device)  # a prefix cache's copy
    pooled.forward([5, 6, 7], outside)
    kept = outside.clone()
    inside = pooled.pooled(outside)
    assert inside.slot == 0 and inside.position == 3 and inside.tokens == [5, 6, 7] and kept.slot is None
    want = pooled.forward([8], kept)
    assert torch.allclose(pooled.forward([8], inside), want, rtol=1e-5, atol=1e-6)
    pooled.release(inside)
    assert pooled.pool.free == 3
    pooled.recompute(inside)
    assert inside.slot == 0 and inside.position == 4
    assert torch.allclose(pooled.forward([9], inside), pooled.forward([9], kept), rtol=1e-4, atol=1e-5)


def test_a_generation_in_a_slot_decodes_through_forward_batch_as_one_of_its_own(pooled, plain):
    from flashmoe.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0)
    calls = []
    batch = pooled.forward_batch
    pooled.forward_batch = lambda ids, states: (calls.append(len(ids)), batch(ids, states))[1]
    try:
        got = [s.token for s in pooled.generate([5, 6, 7], params)]
    finally:
        del pooled.forward_batch
    assert got == [s.token for s in plain.generate([5, 6, 7], params)] and calls == [1] * 5
    assert pooled.pool.free == 3  # the generation's slot came back when it ended
