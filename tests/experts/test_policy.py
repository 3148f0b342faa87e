"""Adaptive placement of resident experts (runtime/policy.py AdaptivePlacement) on synthetic routing."""

import numpy as np

from flashmoe.experts.policy import AdaptivePlacement, SlotMap

LAYERS, EXPERTS, K, ON_GPU = 4, 64, 4, 24


def first_placement() -> np.ndarray:
    on_gpu = np.zeros((LAYERS, EXPERTS), dtype=bool)
    on_gpu[:, :ON_GPU] = True
    return on_gpu


def decode(placement: AdaptivePlacement, routing, tokens: int) -> tuple[float, int]:
    """Feed `tokens` steps of routing(t) -> ids [LAYERS, K]; -> (GPU hit rate over the last quarter, swaps)."""
    hits, swaps = [], 0
    for t in range(tokens):
        ids = routing(t)
        hits.append(placement.on_gpu[np.arange(LAYERS)[:, None], ids].mean())
        uses = np.zeros((LAYERS, EXPERTS))
        np.add.at(uses, (np.repeat(np.arange(LAYERS), K), ids.ravel()), 1)
        placement.observe(uses)
        for layer, up, down in placement.swaps():
            assert not placement.on_gpu[layer, down] and placement.on_gpu[layer, up]
            swaps += 1
        assert (placement.on_gpu.sum(axis=1) == ON_GPU).all()  # a swap moves one expert each way
    return float(np.mean(hits[-tokens // 4 :])), swaps


def test_uniform_routing_swaps_almost_nothing():
    rng = np.random.default_rng(0)
    placement = AdaptivePlacement(first_placement())
    rate, swaps = decode(placement, lambda t: np.stack([rng.choice(EXPERTS, K, replace=False) for _ in range(LAYERS)]), 2000)
    assert swaps <= 25  # 2000 steps x 4 layers of noise: about one swap per 500 layer steps (46 at confidence 3)
    assert abs(rate - ON_GPU / EXPERTS) < 0.05


def test_popular_host_experts_move_to_the_gpu():
    """Each layer's routing favours 16 experts that all start in the host tier: they end up on the GPU."""
    rng = np.random.default_rng(1)
    hot = np.arange(40, 56)
    weights = np.ones(EXPERTS)
    weights[hot] = 20.0
    p = weights / weights.sum()
    placement = AdaptivePlacement(first_placement())
    rate, swaps = decode(placement, lambda t: np.stack([rng.choice(EXPERTS, K, replace=False, p=p) for _ in range(LAYERS)]), 1500)
    assert placement.on_gpu[:, hot].all()
    assert rate > 0.85  # 16 of 24 slots hold experts that draw ~84% of the routing, the rest some too
    assert swaps < LAYERS * 24  # no churn: the hot set moves in once


def test_swaps_per_check_are_capped_and_layers_take_turns():
    heat = np.zeros((LAYERS, EXPERTS))
    heat[:, ON_GPU : ON_GPU + 8] = 1000.0  # every layer has 8 host experts far hotter than any GPU one
    placement = AdaptivePlacement(first_placement(), per_check=3, every=1)
    placement.observe(heat)
    first = placement.swaps()
    placement.observe(np.zeros_like(heat))
    second = placement.swaps()
    assert len(first) == len(second) == 3
    assert [m[0] for m in first] == [0, 0, 0] and [m[0] for m in second] == [1, 1, 1]
    assert {m[1] for m in first} == {ON_GPU, ON_GPU + 1, ON_GPU + 2}  # hottest first
    every = AdaptivePlacement(first_placement(), every=4)
    for step in range(4):
        every.observe(heat)
        assert bool(every.swaps()) == (step == 3)  # counts gather between checks


def test_slot_map_replace_moves_a_key_into_anothers_slot():
    slots = SlotMap(range(4), "static")
    for key in ((0, 1), (0, 2)):
        slots.admit(key, set())
    slot = slots.get((0, 2))
    assert slots.replace((0, 2), (0, 7)) == slot
    assert slots.get((0, 7)) == slot and (0, 2) not in slots and len(slots) == 2
