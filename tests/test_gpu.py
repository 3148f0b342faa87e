"""The GPU path against the CPU path, on a real GPU (skipped without one)."""

import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.runtime.sampling import SamplingParams

from .conftest import FAMILY_CONFIGS, PINNED_TRANSFORMERS, build_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def logits(engine, ids, steps=8):
    state = engine.new_state()
    with torch.inference_mode():
        out = [engine.forward(ids.to(engine.device), state, last_only=False).float().cpu()]
        for t in range(steps):
            out.append(engine.forward(torch.tensor([t + 3], device=engine.device), state).float().cpu())
    return torch.cat(out)


def test_bf16_gpu_logits_match_the_cpu_path(default_init_16):
    """bf16 tolerance, on transformers' own init (the unit-gain parity model is chaotic enough that
    bf16 rounding flips its routing; fp32 on the GPU is checked token for token below)."""
    d, cpu_engine = default_init_16
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))
    cpu = logits(cpu_engine, ids)
    gpu = logits(Engine(d / "q16", EngineConfig(device="cuda")), ids)  # bf16
    assert float((gpu - cpu).norm() / cpu.norm()) < 3e-2


def test_greedy_tokens_identical_to_the_cpu_path_for_32_steps(packed16):
    prompt = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=32, temperature=0)
    cpu = [s.token for s in Engine(packed16, EngineConfig(dtype="float32")).generate(prompt, params)]
    gpu = [s.token for s in Engine(packed16, EngineConfig(device="cuda", dtype="float32")).generate(prompt, params)]
    assert gpu == cpu


@pytest.mark.parametrize("graphs", [True, False])
def test_graphed_decode_equals_eager_decode_and_hands_the_state_back(packed16, graphs):
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0)
    cpu_engine = Engine(packed16, EngineConfig(dtype="float32"))
    state = cpu_engine.new_state()
    ref = [s.token for s in cpu_engine.generate(prompt, params, state=state)]
    ref += [s.token for s in cpu_engine.generate([7, 8], params, state=state)]  # continue the sequence
    engine = Engine(packed16, EngineConfig(device="cuda", preload=False, dtype="float32", cuda_graphs=graphs))
    state = engine.new_state()
    got = [s.token for s in engine.generate(prompt, params, state=state)]
    got += [s.token for s in engine.generate([7, 8], params, state=state)]
    assert got == ref


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_packed(request, tmp_path_factory):
    """(model_type, 16-bit and 4-bit conversions) of a tiny random model of each other family."""
    import transformers

    from flashmoe.convert import convert

    if request.param == "qwen4_exp" and transformers.__version__ != PINNED_TRANSFORMERS:
        pytest.skip(f"transformers {transformers.__version__} builds no qwen4_exp of the released layout (QSA's "
                    f"indexed_attention layers): the reference is {PINNED_TRANSFORMERS}")

    d = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, d / "hf", seed=10)
    convert(d / "hf", d / "q16", bits=16)
    convert(d / "hf", d / "q4", bits=4, group_size=32)
    return request.param, d / "q16", d / "q4"


@pytest.mark.parametrize("graphs", [True, False])
def test_every_family_decodes_on_the_gpu_as_on_the_cpu(family_packed, graphs):
    """Each family's variants on the GPU path (the router kernel's rules, norms of both forms,
    attention without a gate, biases, plain shared experts; Qwen4-Exp's streams, n-gram rows read on
    the host and QSA over a prompt past its budget): fp32 logits within 1e-4 of the CPU path's and
    the same greedy tokens, graphed and eager (Qwen4-Exp always eager, saying why); 4-bit experts
    through the gathered and grouped kernels within their 16-bit fixed-point inputs' error of the
    CPU path's exact arithmetic; 8-bit dense weights (biases included) through the int8 GEMV as
    through the CPU's matmul."""
    _, q16, q4 = family_packed
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(3))
    for packed, tol, dense_bits in ((q16, 1e-4, 16), (q4, 5e-3, 16), (q16, 1e-4, 8)):
        cpu_engine = Engine(packed, EngineConfig(dtype="float32", dense_bits=dense_bits))
        gpu_engine = Engine(packed, EngineConfig(device="cuda", preload=False, dtype="float32", cuda_graphs=graphs, dense_bits=dense_bits))
        obstacle = gpu_engine.model.graph_obstacle()
        assert gpu_engine.cuda_graphs == (graphs and obstacle is None)
        assert (f"eager decode, no CUDA graphs ({obstacle})" in gpu_engine.choices) == (graphs and obstacle is not None)
        cpu, gpu = logits(cpu_engine, ids), logits(gpu_engine, ids)
        assert float((gpu - cpu).norm() / cpu.norm()) < tol
        params = SamplingParams(max_tokens=16, temperature=0)
        want = [s.token for s in cpu_engine.generate(ids.tolist(), params)]
        assert [s.token for s in gpu_engine.generate(ids.tolist(), params)] == want


def test_one_397b_shape_layer_matches_the_cpu_path(tmp_path):
    """Real shapes (a Gated DeltaNet layer with its 512 4-bit experts, 4096 wide) through the GPU tiers
    and kernels, in fp32 on both sides: the GPU differs by its kernel's 16-bit fixed-point inputs. In
    bf16 the comparison measures bf16: the CPU path alone, bf16 against fp32, is 2.9e-2 on this model,
    0.107 at the one position where a near tie flips an expert."""
    from flashmoe.bench.presets import preset_config
    from flashmoe.bench.synthesis import synthesize

    cfg = preset_config("qwen3.5-397b-a17b", layers=1)
    out = synthesize(tmp_path / "m", cfg, bits=4, device="cuda", log=lambda *_: None)
    ids = torch.randint(0, 150000, (12,), generator=torch.Generator().manual_seed(2))
    cpu = logits(Engine(out, EngineConfig(dtype="float32", host_mem=8 << 30)), ids, steps=3)
    gpu = logits(Engine(out, EngineConfig(device="cuda", preload=False, dtype="float32", host_mem=1 << 30, gpu_mem=2 << 30)), ids, steps=3)
    assert float((gpu - cpu).norm() / cpu.norm()) < 5e-3
    assert torch.equal(gpu.argmax(-1), cpu.argmax(-1))


def test_replayed_routing_reaches_the_gpu_tier_through_the_graphed_decode(packed16):
    """The ids a replay substitutes are the ones GpuRoutedExperts fetches and counts, graphs or not."""
    from flashmoe.analysis.routing_trace import ReplayExperts, wrapped_experts

    stream = torch.tensor([[0, 1], [1, 2], [0, 2]])  # layer i gets stream + i, cycled
    runs = []
    for graphs in (True, False):
        engine = Engine(packed16, EngineConfig(device="cuda", preload=False, dtype="float32", cuda_graphs=graphs))
        with wrapped_experts(engine, lambda i, inner: ReplayExperts(inner, stream + i, engine.timer)):
            runs.append([s.token for s in engine.generate([1, 2, 3], SamplingParams(max_tokens=6, temperature=0))])
        assert set(engine.gpu_tier.slots.slot_of) == {(i, e) for i in range(4) for e in range(i, i + 3)}
        tier = engine.gpu_tier.stats
        # per layer: the 3-token prompt looks up its 3 distinct experts (all misses), then 5 decode steps 2 each
        assert (tier.misses, tier.hits) == (4 * 3, 4 * 5 * 2)
    assert runs[0] == runs[1]


def test_a_replay_of_resident_experts_decodes_in_the_graph_as_eager(packed16):
    """Resident experts never sync: the replay picks its rows on the device and is called through
    `graphed` inside the decode graph (the server's S5 replay at the 397B placement)."""
    from flashmoe.analysis.routing_trace import ReplayExperts, wrapped_experts

    stream = torch.tensor([[0, 1], [1, 2], [0, 2]])
    runs = []
    for graphs in (True, False):
        engine = Engine(packed16, EngineConfig(device="cuda", preload=True, dtype="float32", cuda_graphs=graphs))
        with wrapped_experts(engine, lambda i, inner: ReplayExperts(inner, stream + i, engine.timer, host_sync=False)):
            runs.append([s.token for s in engine.generate([1, 2, 3], SamplingParams(max_tokens=6, temperature=0))])
    assert runs[0] == runs[1]


def test_8_bit_dense_gpu_logits_match_the_cpu_path(default_init_16):
    """The Triton GEMV (decode) and converted-codes matmul (prefill) against the CPU's 8-bit path."""
    d, _ = default_init_16
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(5))
    cpu = logits(Engine(d / "q16", EngineConfig(dtype="float32", dense_bits=8)), ids)
    gpu = logits(Engine(d / "q16", EngineConfig(device="cuda", dense_bits=8)), ids)  # bf16
    assert float((gpu - cpu).norm() / cpu.norm()) < 3e-2


@pytest.mark.parametrize("graphs", [True, False])
def test_8_bit_dense_decode_in_cuda_graphs_equals_the_cpu_path(packed16, graphs):
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(6)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0)
    ref = [s.token for s in Engine(packed16, EngineConfig(dtype="float32", dense_bits=8)).generate(prompt, params)]
    engine = Engine(packed16, EngineConfig(device="cuda", preload=False, dtype="float32", cuda_graphs=graphs, dense_bits=8))
    assert [s.token for s in engine.generate(prompt, params)] == ref


@pytest.mark.parametrize("graphs", [True, False])
def test_prefetch_decode_equals_the_cpu_path_under_cache_pressure(packed16, graphs):
    """Copies on the side stream, guesses captured in the graphs, evictions in a 3-expert LRU tier:
    the tokens stay those of the CPU path, and the guesses are counted."""
    from flashmoe.formats.packed import Manifest

    record = Manifest.load(packed16).layout.record_size
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(8)).tolist()
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = [s.token for s in Engine(packed16, EngineConfig(dtype="float32")).generate(prompt, params)]
    engine = Engine(packed16, EngineConfig(device="cuda", dtype="float32", cuda_graphs=graphs, prefetch=True, host_mem=4 * record, gpu_mem=3 * record, cache_policy="lru"))
    gen = engine.generate(prompt, params)
    assert [s.token for s in gen] == ref
    tier = gen.stats.gpu_cache
    assert tier.predicted == 3 * 2 * gen.stats.decode_tokens and tier.prefetched > 0
    assert tier.prefetch_hits <= min(tier.prefetched, tier.predicted_right)


@pytest.mark.parametrize("graphs", [True, False])
def test_cpu_experts_decode_equals_the_plain_gpu_path(packed4, graphs, slow_link):
    """Two of each layer's host-resident misses computed on the CPU (input and weights from the
    routing sync, the sum added after the GPU's experts; graphed and eager): the same tokens as
    without, under a 3-expert tier."""
    pytest.importorskip("numba")
    from flashmoe.formats.packed import Manifest

    record = Manifest.load(packed4).layout.record_size
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(9)).tolist()
    params = SamplingParams(max_tokens=24, temperature=0)
    tokens = {}
    for per_layer in (0, 2):
        engine = Engine(packed4, EngineConfig(device="cuda", preload=False, dtype="float32", cuda_graphs=graphs, cpu_experts=per_layer, gpu_mem=3 * record, cache_policy="static"))
        gen = engine.generate(prompt, params)
        tokens[per_layer] = [s.token for s in gen]
    assert tokens[2] == tokens[0]
    assert gen.stats.gpu_cache.cpu_computed > 0


@pytest.mark.parametrize("graphs, profile", [(True, False), (True, True), (False, False)])
def test_resident_decode_equals_the_cpu_path(packed16, graphs, profile):
    """Preloaded experts read in place (3 of 32 on the GPU, the rest from pinned host memory): the
    whole step as one graph, the per-piece graphs of a profile, and eager decode all give the CPU
    path's tokens, across a continued sequence; every lookup is counted."""
    from flashmoe.formats.packed import Manifest

    record = Manifest.load(packed16).layout.record_size
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(11)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0)
    cpu_engine = Engine(packed16, EngineConfig(dtype="float32"))
    state = cpu_engine.new_state()
    ref = [s.token for s in cpu_engine.generate(prompt, params, state=state)]
    ref += [s.token for s in cpu_engine.generate([7, 8], params, state=state)]
    engine = Engine(packed16, EngineConfig(device="cuda", dtype="float32", cuda_graphs=graphs, profile=profile, gpu_mem=4 * record, host_mem=40 * record, preload=True))
    assert engine.resident
    state = engine.new_state()
    gen = engine.generate(prompt, params, state=state)
    got = [s.token for s in gen]
    got += [s.token for s in engine.generate([7, 8], params, state=state)]
    assert got == ref
    tier = gen.stats.gpu_cache
    assert tier.hits > 0 and tier.host_reads > 0 and tier.misses == tier.bytes_copied == 0
    assert tier.hits + tier.host_reads == 4 * 2 * gen.stats.decode_tokens  # 4 MoE layers, k = 2


@pytest.mark.parametrize("graphs", [True, False])
def test_adaptive_resident_decode_equals_the_cpu_path(packed16, graphs):
    """Preloaded with an adaptive placement that swaps eagerly: experts move between GPU slots and
    pinned host memory between decode steps (copies on the stream the step graph replays on), and
    the tokens stay the CPU path's."""
    from flashmoe.formats.packed import Manifest

    record = Manifest.load(packed16).layout.record_size
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(13)).tolist()
    params = SamplingParams(max_tokens=32, temperature=0)
    ref = [s.token for s in Engine(packed16, EngineConfig(dtype="float32")).generate(prompt, params)]
    engine = Engine(packed16, EngineConfig(device="cuda", dtype="float32", cuda_graphs=graphs, gpu_mem=4 * record, host_mem=40 * record, preload=True))
    engine.gpu_tier.resident.placement.confidence = 0.5  # swap on little evidence: many swaps in 32 steps
    gen = engine.generate(prompt, params)
    assert [s.token for s in gen] == ref
    tier = gen.stats.gpu_cache
    assert tier.swapped > 0 and tier.hits + tier.host_reads == 4 * 2 * gen.stats.decode_tokens


def test_resident_experts_need_no_host_sync(packed16):
    """The resident call runs with CUDA's sync debugging set to error; the copying path's routing
    read trips it (so the check can fail)."""
    from flashmoe.formats.packed import Manifest

    record = Manifest.load(packed16).layout.record_size
    engine = Engine(packed16, EngineConfig(device="cuda", dtype="float32", gpu_mem=4 * record, host_mem=40 * record, preload=True))
    experts = engine.experts[0]
    x = torch.randn(1, engine.args.hidden_size, device="cuda")
    ids, weights = torch.tensor([[1, 6]], device="cuda"), torch.tensor([[0.5, 0.5]], device="cuda")
    def call_without_syncs():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return experts(x, ids, weights)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    y = call_without_syncs()
    engine.set_resident(False)
    with pytest.raises(RuntimeError, match="synchroniz"):
        call_without_syncs()
    assert torch.isfinite(y).all()


def test_one_397b_shape_layer_resident_matches_the_copying_path(tmp_path):
    """Real shapes: a layer of 512 4-bit experts, some 280 of them read in place from pinned host memory."""
    from flashmoe.bench.presets import preset_config
    from flashmoe.bench.synthesis import synthesize

    cfg = preset_config("qwen3.5-397b-a17b", layers=1)
    out = synthesize(tmp_path / "m", cfg, bits=4, device="cuda", log=lambda *_: None)
    ids = torch.randint(0, 150000, (12,), generator=torch.Generator().manual_seed(3))
    copying = Engine(out, EngineConfig(device="cuda", preload=False, host_mem=4 << 30, gpu_mem=2 << 30))
    copying.place_experts(2 * 1024**3 // copying.manifest.layout.record_size, 512)
    ref = logits(copying, ids, steps=3)
    resident = Engine(out, EngineConfig(device="cuda", host_mem=4 << 30, gpu_mem=2 << 30, preload=True))
    assert resident.resident and resident.gpu_tier.capacity < 512
    assert torch.equal(logits(resident, ids, steps=3), ref)


@pytest.mark.parametrize("graphs, profile", [(True, False), (True, True), (False, False)])
def test_resident_cpu_share_decode_equals_resident_decode(packed4, graphs, profile, slow_link):
    """Preloaded with --cpu-experts: the CPU's server takes a share of each layer's host-resident
    experts through the mailbox, inside the step's one graph, the per-piece graphs of a profile,
    and eager decode alike: the same greedy tokens as without, and the experts call still needs
    no host sync."""
    pytest.importorskip("numba")
    from flashmoe.formats.packed import Manifest

    record = Manifest.load(packed4).layout.record_size
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(12)).tolist()
    params = SamplingParams(max_tokens=24, temperature=0)
    tokens, stats = {}, {}
    for per_layer in (0, 2):
        engine = Engine(packed4, EngineConfig(device="cuda", dtype="float32", cuda_graphs=graphs, profile=profile, gpu_mem=4 * record, host_mem=40 * record, preload=True, cpu_experts=per_layer))
        gen = engine.generate(prompt, params)
        tokens[per_layer], stats[per_layer] = [s.token for s in gen], gen.stats.gpu_cache
    assert tokens[2] == tokens[0]
    on, off = stats[2], stats[0]
    assert on.cpu_computed > 0 and on.hits + on.host_reads + on.cpu_computed == off.hits + off.host_reads
    experts = engine.experts[0]
    x = torch.randn(1, engine.args.hidden_size, device="cuda")
    ids, weights = torch.tensor([[5, 6]], device="cuda"), torch.tensor([[0.5, 0.5]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = experts(x, ids, weights)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    engine.set_cpu_experts(0)
    ref = experts(x, ids, weights)  # the GPU kernel's inputs in 16-bit fixed point, the CPU's exact: 1e-4-ish
    assert float((y - ref).norm() / ref.norm()) < 5e-4


def test_one_397b_shape_layer_with_the_cpu_share_matches_resident_decode(tmp_path, slow_link):
    """Real shapes: 200-odd of 512 experts in pinned host memory; one decode token routed to 8 of
    them and 2 GPU-resident ones, fp32 input. With --cpu-experts 2 the CPU computes 2 of the 8 and
    the GPU reads 6 over PCIe: the layer's expert output matches the GPU reading all 8, up to the GPU
    kernel's rounding of its inputs to 16 bits per group (the logits of a synthetic layer would not
    show it: its experts' output is lost in the bf16 rounding of the residual)."""
    pytest.importorskip("numba")
    from flashmoe.bench.presets import preset_config
    from flashmoe.bench.synthesis import synthesize

    cfg = preset_config("qwen3.5-397b-a17b", layers=1)
    out = synthesize(tmp_path / "m", cfg, bits=4, device="cuda", log=lambda *_: None)
    engine = Engine(out, EngineConfig(device="cuda", host_mem=4 << 30, gpu_mem=2 << 30, preload=True))
    tier, experts = engine.gpu_tier, engine.experts[0]
    ids = torch.tensor([[0, 1, 400, 401, 402, 403, 500, 501, 502, 503]], device="cuda")
    assert int((tier.resident.table[0, ids] >= tier.capacity).sum() + (tier.resident.table[0, ids] < 0).sum()) == 8
    weights = torch.softmax(torch.randn(1, 10, generator=torch.Generator().manual_seed(5)), -1).cuda()
    x = torch.randn(1, engine.args.hidden_size, generator=torch.Generator().manual_seed(6)).cuda()
    with torch.inference_mode():
        ref = experts(x, ids, weights)
        engine.set_cpu_experts(2)
        got = experts(x, ids, weights)
    engine.settle("prefill")
    assert tier.stats.cpu_computed == 2
    assert float((got - ref).norm() / ref.norm()) < 5e-4  # the GPU kernel's 16-bit inputs against the CPU's exact


def test_a_dead_graph_in_a_reference_cycle_is_not_collected_mid_capture():
    """The collector, run at nearly every allocation, would reset the dead graph inside the new
    capture (which the capturing stream refuses); DecodeGraph records with it off."""
    import gc

    from flashmoe.runtime.graphs import _no_collection_while_capturing

    class Holder:
        pass

    thresholds = gc.get_threshold()
    gc.collect()
    try:
        dead = Holder()
        dead.me, dead.graph = dead, torch.cuda.CUDAGraph()
        with torch.cuda.graph(dead.graph):
            torch.ones(8, device="cuda").mul_(2)
        del dead
        gc.set_threshold(1, 1, 1)
        graph, x = torch.cuda.CUDAGraph(), torch.zeros(8, device="cuda")
        with _no_collection_while_capturing(), torch.cuda.graph(graph):
            for _ in range(100):
                [[] for _ in range(10)]  # allocations that set the collector off
            x.add_(1)
        graph.replay()
        assert x.tolist() == [1.0] * 8
    finally:
        gc.set_threshold(*thresholds)
        gc.collect()


def test_a_batch_decodes_on_the_gpu_as_each_alone(packed4):
    """forward_batch on the GPU path, eagerly (gathered kernels)."""
    from .test_engine import check_batched_decode

    check_batched_decode(Engine(packed4, EngineConfig(device="cuda", dtype="float32", cuda_graphs=False)))


@pytest.mark.parametrize("preload", [False, True], ids=["copying", "resident"])
def test_a_batch_decodes_through_its_graph_as_each_alone(packed4, preload):
    """forward_batch through the pool's graphs (runtime/graphs.py): with copied experts, graphs
    around the host's expert calls; resident, the whole step one graph, for more sequences than an
    eager call gives the gathered kernels (GpuRoutedExperts.graphed)."""
    from flashmoe.experts.gpu_routed import DECODE_MAX_TOKENS
    from .test_engine import PROMPTS, check_batched_decode

    n = DECODE_MAX_TOKENS + 4 if preload else 3
    engine = Engine(packed4, EngineConfig(device="cuda", dtype="float32", preload=preload, decode_slots=16))
    check_batched_decode(engine, steps=4, prompts=[[t + i for t in PROMPTS[i % 3]] for i in range(n)])
    graph = engine._pool_graphs[16 if preload else 4]
    assert graph.valid() and len(graph.states) == (16 if preload else 4)
    if preload:
        assert [name for name, _ in graph.segments] == ["step (graph)"]


def test_a_bucket_graph_outlives_a_preemption_and_is_recorded_again_when_a_slot_grows(packed4):
    """A preempted sequence rebuilt in its slot's buffers replays the same graph; a sequence past
    its slot's KV buffer grows that slot alone, and the bucket's graph is recorded again."""
    from flashmoe.layers.state import KVCache, StatePool
    from .test_engine import PROMPTS

    engine = Engine(packed4, EngineConfig(device="cuda", dtype="float32", preload=True, decode_slots=2))
    engine.pool = StatePool(lambda: engine.model.new_state(engine.dtype, engine.device), 2, capacity=12)
    states = [engine.new_state() for _ in PROMPTS[:2]]
    for prompt, state in zip(PROMPTS, states):
        engine.forward(prompt, state)
    engine.forward_batch([[1], [2]], states)
    graph = engine._pool_graphs[2]
    engine.release(states[0])
    engine.recompute(states[0])
    assert states[0].slot == 0 and graph.valid()
    kept = states[1].clone()
    got = engine.forward_batch([[3], [4]], states)[1]
    assert engine._pool_graphs[2] is graph
    want = engine.forward([4], kept)[0]
    # a batch's kernels round differently from one sequence's (test_engine.check_batched_decode;
    # 1.16e-4 on the H100 with the batch attention kernel)
    assert float((got - want).norm() / want.norm()) < 1e-3 and int(got.argmax()) == int(want.argmax())
    sizes, limit = [c.k.shape[0] for c in states[1].layers if isinstance(c, KVCache)], StatePool.limit(states[1])
    while states[1].position <= limit:  # past slot 1's scratch position
        token = 5 + states[1].position % 100
        got = engine.forward_batch([[token], [token]], states)[1]
        want = engine.forward([token], kept)[0]
    assert engine._pool_graphs[2] is not graph
    assert all(c.k.shape[0] > size for c, size in zip((c for c in states[1].layers if isinstance(c, KVCache)), sizes))
    assert float((got - want).norm() / want.norm()) < 1e-3 and int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("preload", [False, True], ids=["copying", "resident"])
def test_pooled_sequences_decode_through_their_bucket_graph_as_each_alone(packed4, preload):
    """decode_slots: sequences in StatePool slots step through the graph of their bucket of slots,
    recorded once: with a slot idle between two running ones (its sequence paused, then resumed
    where it stopped), and with a sequence leaving and another joining the bucket."""
    from .test_engine import PROMPTS, _alone

    engine = Engine(packed4, EngineConfig(device="cuda", dtype="float32", preload=preload, decode_slots=4))
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], [7, 8, 9, 10]]
    alone = [_alone(engine, p, 6) for p in prompts]
    states = [engine.new_state() for _ in prompts[:3]]
    assert [s.slot for s in states] == [0, 1, 2]
    out = {i: engine.forward(p, s)[-1] for i, (p, s) in enumerate(zip(prompts, states))}
    done = [0, 0, 0, 0]

    def step(running: list[int]) -> None:
        for i in running:
            logits, tokens = alone[i]
            assert float((out[i].cpu() - logits[done[i]].cpu()).norm() / logits[done[i]].cpu().norm()) < 1e-3, (i, done[i])
            assert int(out[i].argmax()) == tokens[done[i]]
        got = engine.forward_batch([[alone[i][1][done[i]]] for i in running], [states[i] for i in running])
        for row, i in enumerate(running):  # a copy: the graph's logits buffer is the next step's too
            out[i], done[i] = got[row].clone(), done[i] + 1

    step([0, 1, 2])
    graph = engine._pool_graphs[4]
    step([0, 2])  # slot 1 idles: its states must not move
    step([0, 2])
    step([0, 1, 2])  # slot 1 resumes where it stopped
    engine.release(states[2])
    states[2] = None
    states.append(engine.new_state())  # joins the bucket in the slot the other left
    assert states[3].slot == 2
    out[3] = engine.forward(prompts[3], states[3])[-1]
    step([0, 1, 3])
    assert engine._pool_graphs[4] is graph  # nobody's coming or going recorded anything
    params = SamplingParams(max_tokens=8, temperature=0)
    plain = Engine(packed4, EngineConfig(device="cuda", dtype="float32", preload=preload))
    assert [s.token for s in engine.generate(prompts[0], params)] == [s.token for s in plain.generate(prompts[0], params)]
