"""The GPU path's expert logic (tiers, admission, staging, decode kernels, grouped prefill) against
the CPU path. Without a GPU it runs on the CPU with the kernels in Triton's interpreter."""

import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(engine, ids, steps=4):
    state = engine.new_state()
    with torch.inference_mode():
        out = [engine.forward(ids.to(engine.device), state, last_only=False).cpu()]
        for t in range(steps):
            out.append(engine.forward(torch.tensor([t + 3], device=engine.device), state).cpu())
    return torch.cat(out)


@pytest.mark.parametrize("policy", ["lru", "mix", "static"])
def test_gpu_path_matches_cpu_path_under_cache_pressure(packed16, policy):
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2))  # > 8 tokens: grouped prefill
    reference = run(Engine(packed16, EngineConfig(dtype="float32")), ids)
    record = Manifest.load(packed16).layout.record_size
    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", host_mem=4 * record, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=3 * record, policy=policy)  # 3 of 32 experts cached on the "GPU"
    got = run(engine, ids)
    assert float((got - reference).norm() / reference.norm()) < 1e-4
    tier = engine.gpu_tier.stats
    assert tier.misses > 0 and tier.bytes_copied == tier.misses * record
    if policy == "static":
        assert tier.admitted == 3  # filled once, never replaced


def test_preload_places_experts_and_counts_start_fresh(packed16):
    record = Manifest.load(packed16).layout.record_size
    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=10 * record, policy="static")
    engine.gpu_tier.preload(0, [0, 1, 2, 3, 4, 5, 6, 7], engine.store)
    engine.gpu_tier.preload(1, [0, 1], engine.store)
    assert len(engine.gpu_tier.slots.slot_of) == 10 and engine.gpu_tier.stats.hits == 0
    for (layer, e), slot in engine.gpu_tier.slots.slot_of.items():  # each slot holds exactly its record
        f = engine.manifest.expert_file(layer)
        on_disk = (packed16 / f.file).read_bytes()[e * record : (e + 1) * record]
        assert engine.gpu_tier.pool[slot].cpu().numpy().tobytes() == on_disk


def test_gpu_out_of_memory_names_the_budget_to_lower(packed16, monkeypatch):
    from flashmoe.engine import GpuMemoryError
    from flashmoe.experts import tier

    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", gpu_path_on_cpu=DEVICE == "cpu", preload=False))

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tier.torch, "empty", no_memory)
    with pytest.raises(GpuMemoryError, match="lower --gpu-mem"):
        engine.use_gpu_experts(gpu_mem=4 << 20)
    monkeypatch.undo()
    monkeypatch.setattr(engine.model, "forward", no_memory)
    with pytest.raises(GpuMemoryError, match="lower --gpu-mem.*chunks of 2048"):
        list(engine.generate([1, 2, 3]))


def decode_with_tier_stats(engine, ids, steps=4):
    """run() (a 12-token grouped prefill, then one-token decode steps) and the tier's counters;
    the number of expert lookups is counted from the routing each layer's experts received."""
    lookups = []
    for i in engine.moe_layers:
        def counting(x, ids, weights, inner=engine.experts[i], **out):
            lookups.append(len(set(ids[:, : weights.shape[1]].flatten().tolist())))
            return inner(x, ids, weights, **out)
        engine.experts[i] = counting
    out = run(engine, ids, steps)
    return out, engine.gpu_tier.stats, sum(lookups)


# Each policy with each kind of guess would double the time (Triton's interpreter); these two
# cover guesses admitted to the cache (lru) and guesses that only fit prefetch slots (static).
@pytest.mark.parametrize("policy, guess", [("lru", "router"), ("static", "wrong")])
def test_prefetch_changes_no_result_under_cache_pressure(packed16, policy, guess):
    """Guessed experts land in cached or prefetch slots, mispredictions are copied as misses, and
    evictions under a 3-expert tier never serve a wrong record: the logits equal prefetch off."""
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2))
    record = Manifest.load(packed16).layout.record_size
    runs = {}
    for prefetch in (False, True):
        engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", host_mem=4 * record, prefetch=prefetch, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
        engine.use_gpu_experts(gpu_mem=3 * record, policy=policy)
        if prefetch and guess == "wrong":  # always the same two experts in decode: mostly wrong, often evicted
            for i in engine.guesses:
                engine.guesses[i] = lambda x: None if len(x) > 8 else torch.tensor([[7, 6]] * len(x), device=x.device)
        runs[prefetch] = decode_with_tier_stats(engine, ids, steps=6)
    (plain, off, lookups), (got, on, lookups_on) = runs[False], runs[True]
    assert torch.equal(got, plain)
    assert lookups_on == lookups == off.hits + off.misses == on.hits + on.misses
    assert on.bytes_copied == (on.misses + on.prefetched) * record
    assert on.predicted == 3 * 6 * 2  # layers 1-3 guessed in each decode step, 2 experts each
    assert 0 < on.prefetched and on.prefetch_hits <= min(on.prefetched, on.predicted_right)
    if policy == "static":  # same residents with and without prefetch: each used prefetch saves one miss
        assert on.misses == off.misses - on.prefetch_hits
    assert off.prefetched == off.predicted == 0


def test_prefetch_is_refused_without_its_slots(packed16):
    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=None)
    with pytest.raises(ValueError, match="prefetch=True"):
        engine.set_prefetch(True)


def test_cpu_experts_change_no_result_and_take_misses_off_the_copies(packed4, slow_link):
    """Host-resident misses computed by the CPU kernel instead of copied: the logits match the
    plain GPU path's, and under a static 3-expert tier each CPU-computed expert is one copy fewer."""
    pytest.importorskip("numba")
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    record = Manifest.load(packed4).layout.record_size
    runs = {}
    for per_layer in (0, 2):
        engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", cpu_experts=per_layer, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
        engine.use_gpu_experts(gpu_mem=3 * record, policy="static")
        runs[per_layer] = decode_with_tier_stats(engine, ids, steps=4)
    (plain, off, lookups), (got, on, lookups_on) = runs[0], runs[2]
    # the GPU kernel rounds its inputs to 16-bit fixed point per group, the CPU kernel does not (8e-5 measured)
    assert float((got - plain).norm() / plain.norm()) < 5e-4
    assert lookups == lookups_on
    assert on.cpu_computed > 0 and off.cpu_computed == 0
    assert on.misses == off.misses - on.cpu_computed  # same residents: each CPU expert saved a copy
    assert on.bytes_copied == on.misses * record
    assert on.cpu_computed <= 2 * 4 * 4  # at most 2 per layer, 4 layers, 4 one-token steps (none in prefill)


def test_cpu_experts_refuse_what_they_cannot_do(packed16, packed4):
    pytest.importorskip("numba")
    with pytest.raises(ValueError, match="GPU expert path"):
        Engine(packed4, EngineConfig(dtype="float32")).set_cpu_experts(1)
    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=None)
    with pytest.raises(ValueError, match="quantized experts only"):
        engine.set_cpu_experts(1)


def test_resident_experts_read_in_place_match_the_copying_path(packed4):
    """Preloaded, decode reads every expert where it lies: its GPU slot, or in place in the host
    tier through a slot number relative to the GPU pool (past its end or negative); prefill copies
    host-resident experts into staging slots only. Logits equal the copying path's bit for bit,
    nothing is read from disk or admitted, and every decode lookup is counted."""
    from dataclasses import replace

    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(5))
    record = Manifest.load(packed4).layout.record_size
    runs = {}
    for resident in (False, True):
        engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
        engine.use_gpu_experts(gpu_mem=8 * record, policy="lru")  # lru would admit every miss, if allowed
        engine.preload() if resident else engine.place_experts(2, 6)  # the same placement: 2 of 8 per layer on the GPU
        assert engine.resident == resident
        placed = dict(engine.gpu_tier.slots.slot_of)
        state, tier = engine.new_state(), engine.gpu_tier
        with torch.inference_mode():
            out = [engine.forward(ids.to(engine.device), state, last_only=False).cpu()]
            engine.settle("prefill")
            after_prefill = replace(tier.stats)
            for t in range(3):
                out.append(engine.forward(torch.tensor([t + 3], device=engine.device), state).cpu())
        engine.settle("prefill")
        runs[resident] = torch.cat(out), tier.stats - after_prefill, engine.store.stats, placed == tier.slots.slot_of
    (ref, off, _, _), (got, on, store, unchanged) = runs[False], runs[True]
    assert torch.equal(got, ref)
    assert off.misses > 0 and on.misses == on.bytes_copied == 0 and on.hits > 0 and on.host_reads > 0
    assert on.hits + on.host_reads == 4 * 3 * 2  # 4 layers, 3 decode steps, k = 2
    assert on.hit_rate == on.hits / (on.hits + on.host_reads)
    assert unchanged and store.misses == store.bytes_read == 0  # prefill's records were all host-tier hits


def test_generation_counts_every_resident_lookup_once_with_queued_reads(packed4):
    """A decode step's device counters are read by a copy queued behind its forward and collected
    after the token's read (Generation._measured): each generation still gets exactly its own
    lookups, also when two generations interleave step by step."""
    from flashmoe.runtime.sampling import SamplingParams

    record = Manifest.load(packed4).layout.record_size
    engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=8 * record, policy="static")
    engine.preload()
    assert engine.resident
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    gens = [engine.generate([1, 2, 3], params), engine.generate([4, 5], params)]
    steps = [iter(g) for g in gens]
    for _ in range(params.max_tokens):
        for s in steps:
            next(s)
    moe_layers, k = len(engine.moe_layers), engine.top_k
    for g in gens:
        tier = g.stats.gpu_cache
        assert g.stats.decode_tokens == params.max_tokens - 1
        assert tier.hits > 0 and tier.hits + tier.host_reads == moe_layers * k * g.stats.decode_tokens


def test_resident_cpu_share_changes_no_result_and_takes_reads_off_pcie(packed4, slow_link):
    """Preloaded, with --cpu-experts 1: each decode layer hands some of its host-resident experts to
    the CPU's server through the mailbox (no host sync). Logits match resident decode without it
    (the CPU's sum is rounded apart), every lookup is counted once, as a GPU hit, a read over PCIe
    or a CPU expert, and turning the share off stops the server's threads."""
    pytest.importorskip("numba")
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(6))
    record = Manifest.load(packed4).layout.record_size
    runs = {}
    for per_layer in (0, 1):
        engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record, cpu_experts=per_layer, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
        engine.use_gpu_experts(gpu_mem=8 * record, policy="static")
        engine.preload()  # 2 of 8 experts per layer on the GPU: most routed experts lie in the host tier
        tier = engine.gpu_tier
        assert (tier.cpu_share is not None) == bool(per_layer)
        if per_layer:  # the split measured at start (a slow link here: the CPU takes all it may) is said and reported
            assert engine.cpu_split.counts == (0, 1, 2) and engine.cpu_split is tier.cpu_share.split
            assert any(c.startswith("CPU share by measured rates") for c in engine.choices)
        state = engine.new_state()
        with torch.inference_mode():
            out = [engine.forward(ids.to(engine.device), state, last_only=False).cpu()]  # prefill: copies, no CPU share
            engine.settle("prefill")
            tier.stats = type(tier.stats)()
            for t in range(3):
                out.append(engine.forward(torch.tensor([t + 3], device=engine.device), state).cpu())
        engine.settle("prefill")
        runs[per_layer] = torch.cat(out), tier.stats
        if per_layer:
            threads = tier.cpu_share.server._running
            engine.set_cpu_experts(0)
            assert tier.cpu_share is None and not any(t.is_alive() for t in threads)
    (plain, off), (got, on) = runs[0], runs[1]
    assert float((got - plain).norm() / plain.norm()) < 5e-4  # the GPU kernel's 16-bit inputs, as above
    assert off.cpu_computed == 0 and 0 < on.cpu_computed <= 4 * 3  # at most 1 per layer, 4 layers, 3 steps
    assert on.hits + on.host_reads + on.cpu_computed == off.hits + off.host_reads == 4 * 3 * 2
    assert on.host_reads == off.host_reads - on.cpu_computed


def test_resident_table_points_every_expert_at_its_record(packed4):
    record = Manifest.load(packed4).layout.record_size
    engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=9 * record, policy="static")  # 9 // 4 layers: 2 each on the GPU
    engine.preload()
    tier, store = engine.gpu_tier, engine.store
    for layer in range(4):
        on_disk = (packed4 / engine.manifest.expert_file(layer).file).read_bytes()
        for e in range(8):
            slot = int(tier.resident.host_table[layer, e])
            held = tier.pool[slot] if 0 <= slot < tier.capacity else store.pool[slot - tier.host_slot0]
            assert (0 <= slot < tier.capacity) == (e < 2)
            assert held.cpu().numpy().tobytes() == on_disk[e * record : (e + 1) * record]


def test_preload_refuses_what_it_cannot_do(packed16):
    from flashmoe.experts.store import BudgetError

    record = Manifest.load(packed16).layout.record_size
    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", host_mem=10 * record, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=8 * record, policy="static")
    with pytest.raises(BudgetError, match=r"host tier must hold .*raise --host-mem to at least"):
        engine.preload()  # 4 layers x 6 experts do not fit 10 host slots
    engine = Engine(packed16, EngineConfig(device=DEVICE, dtype="float32", prefetch=True, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=None)
    with pytest.raises(ValueError, match="excludes --prefetch"):
        engine.preload()
    engine.set_prefetch(False)
    engine.preload()
    with pytest.raises(ValueError, match="exclude each other"):
        engine.set_prefetch(True)
    with pytest.raises(ValueError, match="GPU expert path"):
        Engine(packed16, EngineConfig(dtype="float32")).preload()


def test_adaptive_placement_swaps_by_use_and_changes_no_result(packed4):
    """Preloaded with an adaptive policy: between decode steps, host-resident experts in clearly
    more use than GPU-resident ones trade places with them (both records move, and the table with
    them). Logits equal the static placement's bit for bit, the table points every expert at its
    record, a generation swaps on its own, and placing again restores the first placement without
    reading the disk."""
    from flashmoe.runtime.sampling import SamplingParams

    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(7))
    record = Manifest.load(packed4).layout.record_size
    runs = {}
    for adaptive in (False, True):
        engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record, gpu_path_on_cpu=DEVICE == "cpu", preload=False))
        engine.use_gpu_experts(gpu_mem=8 * record, policy="mix")
        engine.place_experts(2, 6)
        engine.set_resident(True, adaptive)
        tier = engine.gpu_tier
        assert (tier.resident.placement is not None) == adaptive
        if adaptive:
            tier.resident.placement.confidence = 0.5  # a few steps of a tiny model's routing are evidence enough
        state = engine.new_state()
        with torch.inference_mode():
            out = [engine.forward(ids.to(engine.device), state, last_only=False).cpu()]
            for t in range(6):
                tier.resident.collect()
                tier.resident.revise(engine.store)  # where Generation does it: between steps
                out.append(engine.forward(torch.tensor([t + 3], device=engine.device), state).cpu())
        tier.resident.collect()
        runs[adaptive] = torch.cat(out), tier.stats.swapped, tier.stats.hits
    (ref, _, static_hits), (got, swapped, hits) = runs[False], runs[True]
    assert torch.equal(got, ref)
    assert swapped > 0 and hits > static_hits
    store = engine.store
    for layer in range(4):
        on_disk = (packed4 / engine.manifest.expert_file(layer).file).read_bytes()
        for e in range(8):
            slot = int(tier.resident.host_table[layer, e])
            on_gpu = 0 <= slot < tier.capacity
            assert on_gpu == ((layer, e) in tier.slots) == ((layer, e) not in store.slots) == tier.resident.on_gpu[layer, e]
            held = tier.pool[slot] if on_gpu else store.pool[slot - tier.host_slot0]
            assert held.cpu().numpy().tobytes() == on_disk[e * record : (e + 1) * record]
            assert int(tier.resident.table[layer, e]) == slot
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    gen = engine.generate([1, 2, 3], params)
    list(gen)
    assert gen.stats.gpu_cache.swapped > 0
    engine.set_resident(False)
    reads = []
    store._read = lambda key, slot: reads.append(key)
    engine.place_experts(2, 6)
    assert set(tier.slots.slot_of) == {(layer, e) for layer in range(4) for e in range(2)}
    assert not reads  # every record moved between the tiers, none read again


def test_preload_is_chosen_when_the_tiers_hold_every_expert(packed4):
    """Without --preload / --no-preload the engine preloads when the GPU and host budgets hold every
    expert (and streams otherwise, or with --prefetch), and says which and why; --no-preload streams."""
    record = Manifest.load(packed4).layout.record_size
    gpu = dict(device=DEVICE, dtype="float32", gpu_path_on_cpu=DEVICE == "cpu")
    chosen = Engine(packed4, EngineConfig(**gpu, gpu_mem=8 * record, host_mem=64 * record))
    assert chosen.resident and any(c.startswith("experts preloaded (auto: ") for c in chosen.choices)
    assert chosen.store.stats.bytes_read == 0  # the preload's reads are not decode's
    short = Engine(packed4, EngineConfig(**gpu, gpu_mem=2 * record, host_mem=8 * record))
    assert not short.resident and any("experts streamed (auto: GPU and host budgets are" in c for c in short.choices)
    for flags, why in ((dict(preload=False), None), (dict(prefetch=True), "experts streamed (--prefetch)")):
        engine = Engine(packed4, EngineConfig(**gpu, **flags))
        assert not engine.resident and (why is None or why in engine.choices)


def test_a_decode_graphs_resident_experts_take_the_gathered_kernels_for_a_whole_batch(packed4):
    """GpuRoutedExperts.graphed: a batch of sequences' tokens through the gathered gemv (no host
    sync), past the few tokens an eager call takes there, as the grouped kernels compute them."""
    from flashmoe.experts.gpu_routed import DECODE_MAX_TOKENS

    record = Manifest.load(packed4).layout.record_size
    engine = Engine(packed4, EngineConfig(device=DEVICE, dtype="float32", host_mem=32 * record,
                                          gpu_path_on_cpu=DEVICE == "cpu", preload=False))
    engine.use_gpu_experts(gpu_mem=8 * record, policy="lru")
    engine.preload()
    experts, T = engine.experts[engine.moe_layers[0]], DECODE_MAX_TOKENS + 4
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, engine.args.hidden_size, generator=g).to(engine.device)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)]).to(engine.device)
    weights = torch.rand(T, 2, generator=g).to(engine.device)
    residual = torch.randn(T, engine.args.hidden_size, generator=g).to(engine.device)
    lookups = int(engine.gpu_tier.resident.uses.sum())
    got = experts.graphed(x, ids, weights, residual)
    assert int(engine.gpu_tier.resident.uses.sum()) == lookups + T * 2  # counted on the device: no host sync
    want = experts(x, ids, weights, residual=residual)  # eagerly: the grouped kernels
    # the gemv reads its inputs as 16-bit fixed point (kernels/codes.layout_xq), the grouped kernels as fp32
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-4
