"""Routing traces: recording (against transformers' router), the file, the replay hook, and the
locality statistics and generator (runtime/locality.py)."""

import numpy as np
import pytest
import torch

from flashmoe.analysis import locality as L
from flashmoe.analysis.routing_trace import RecordingExperts, ReplayExperts, RoutingTrace, TraceError, record, wrapped_experts


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from flashmoe.convert import convert
    from flashmoe.engine import Engine, EngineConfig

    from tests.conftest import build_hf_model

    d = tmp_path_factory.mktemp("trace")
    hf = build_hf_model("text", d / "hf", seed=3)
    convert(d / "hf", d / "q16", bits=16)
    return hf, Engine(d / "q16", EngineConfig(dtype="float32"))


def topic_trace(tokens=1500, layers=2, experts=32, k=4, seed=1) -> np.ndarray:
    """Routing with real-text-like locality from another mechanism than the generator's: a topic
    that persists for ~30 tokens picks from its own skewed set of experts, plus a global Zipf."""
    rng = np.random.default_rng(seed)
    zipf = 1 / np.arange(1, experts + 1)
    glob = np.stack([zipf[rng.permutation(experts)] for _ in range(layers)])
    topics = np.stack([[zipf[rng.permutation(experts)] ** 2 for _ in range(layers)] for _ in range(5)])
    glob, topics = glob / glob.sum(-1, keepdims=True), topics / topics.sum(-1, keepdims=True)
    ids, z = np.empty((tokens, layers, k), np.int16), 0
    for t in range(tokens):
        z = rng.integers(5) if rng.random() > 0.97 else z
        for i in range(layers):
            ids[t, i] = rng.choice(experts, k, replace=False, p=0.7 * topics[z, i] + 0.3 * glob[i])
    return ids


def test_recorded_ids_are_the_routers_choice(text_model):
    hf, engine = text_model
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    trace = record(engine, ids.tolist(), "random bytes")
    assert trace.ids.shape == (40, 4, 2) and trace.num_experts == 8 and trace.source == "random bytes"
    with torch.no_grad():
        logits = hf(ids[None], output_router_logits=True).router_logits  # per layer [T, E]
    expected = np.stack([torch.topk(x.reshape(40, 8), 2).indices.numpy() for x in logits], axis=1)
    assert (np.sort(trace.ids, -1) == np.sort(expected, -1)).all()
    # the hook is gone afterwards: the layers hold their own experts again
    assert not any(isinstance(e, RecordingExperts) for e in engine.experts)


def test_statistics_of_a_hand_built_trace():
    ids = np.array([[[0, 1]], [[0, 2]]] * 20, dtype=np.int16)  # expert 0 every token, 1 and 2 alternate
    assert L.sorted_shares(ids, 4).tolist() == [[0.5, 0.25, 0.25, 0.0]]
    assert L.reuse_profile(ids, (1, 4)).tolist() == [[0.5, 1.0]]
    assert L.load_entropy(L.sorted_shares(ids, 4))[0] == pytest.approx(1.5 * np.log(2) / np.log(4))
    assert L.rescale_shares(np.array([[0.5, 0.25, 0.25, 0.0]]), 8).round(4).tolist() == [[0.25, 0.25, 0.125, 0.125, 0.125, 0.125, 0, 0]]


def test_generator_reproduces_the_locality_and_hit_rates_at_the_trace_shape():
    real = topic_trace()
    fake = L.fit_replay(real, 32, 32, 4, tokens=1000).generate(len(real))
    want, got = L.Locality.of(real, 32), L.Locality.of(fake, 32)
    assert np.abs(got.reuse - want.reuse).max() < 0.03
    assert np.abs(np.cumsum(got.shares, 1) - np.cumsum(want.shares, 1)).max() < 0.04
    for policy in ("lru", "lfu", "mix"):  # measured: differences of 0.001-0.03
        for capacity in (16, 32):
            assert abs(L.hit_rate(policy, capacity, fake) - L.hit_rate(policy, capacity, real)) < 0.06, (policy, capacity)


def test_generator_carries_the_locality_to_a_bigger_shape():
    real = topic_trace()
    gen = L.fit_replay(real, 32, 256, 6)
    big = gen.generate(2000, layers=5)
    assert big.shape == (2000, 5, 6) and big.max() < 256
    assert (np.sort(big, -1)[..., 1:] != np.sort(big, -1)[..., :-1]).all()  # k distinct experts
    rows = np.arange(5) * 2 // 5  # target layer -> trace layer
    target = L.rescale_shares(L.sorted_shares(real, 32), 256)[rows]
    assert np.abs(np.cumsum(L.rank_shares(big, 256), 1) - np.cumsum(target, 1)).max() < 0.05  # measured 0.02-0.03
    assert np.abs(L.reuse_profile(big) - gen.target_reuse[rows]).max() < 0.04
    uniform_reuse = 6 / 256
    assert (L.reuse_profile(big)[:, 0] > 3 * uniform_reuse).all()  # the locality survived


def test_a_uniform_trace_stays_uniform_at_a_bigger_shape():
    rng = np.random.default_rng(0)
    real = np.stack([[rng.choice(16, 4, replace=False) for _ in range(2)] for _ in range(1000)]).astype(np.int16)
    big = L.fit_replay(real, 16, 128, 8, tokens=800).generate(800)
    assert L.load_entropy(L.rank_shares(big, 128)).min() > 0.97
    assert L.reuse_profile(big)[:, 0].max() < 2 * 8 / 128


def test_replay_hands_the_substituted_ids_to_the_experts_and_the_store(packed16):
    from flashmoe.engine import Engine, EngineConfig
    from flashmoe.runtime.sampling import SamplingParams

    engine = Engine(packed16, EngineConfig(dtype="float32"))
    stream = torch.tensor([[0, 1], [2, 3], [0, 2]])  # cycled; layer i gets stream + i
    with wrapped_experts(engine, lambda i, inner: ReplayExperts(RecordingExperts(inner), stream + i, engine.timer)) as replays:
        list(engine.generate([5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0)))
    for i, replay in enumerate(replays):
        seen = torch.cat(replay.inner.ids)  # 4 prompt tokens, then 2 decoded ones
        assert seen.tolist() == (stream + i)[torch.arange(6) % 3].tolist()
    loaded = set(engine.store.slots.slot_of)
    assert loaded == {(i, e) for i in range(4) for e in range(i, i + 4)}
    assert all(not isinstance(e, ReplayExperts) for e in engine.experts)
    with pytest.raises(TraceError, match="has 3 experts per token; the router chose 2"):
        ReplayExperts(lambda *a: None, torch.zeros(4, 3), engine.timer)(None, torch.zeros(1, 2), None)


def test_replay_without_host_sync_reads_the_same_stream_on_the_device():
    """Resident experts never read the routing on the host: the replay then indexes the stream at
    a device-side position (capturable in a graph) and must hand out the same rows."""
    from flashmoe.models.context import NullTimer

    stream = torch.tensor([[0, 1], [2, 3], [4, 5]])
    seen = {}
    for host_sync in (True, False):
        replay = ReplayExperts(lambda x, ids, w, **out: ids, stream, NullTimer(), host_sync)
        seen[host_sync] = [replay(None, torch.zeros(t, 2, dtype=torch.long), None).tolist() for t in (1, 2, 1, 1)]
    assert seen[False] == seen[True] == [[[0, 1]], [[2, 3], [4, 5]], [[0, 1]], [[2, 3]]]


def test_a_capturable_replay_hands_the_graph_its_stream():
    """Resident experts decode inside a CUDA graph through `graphed` (runtime/graphs.py): the
    replay must offer it, on the stream's rows (a server's S5 replay on the GPU lost every
    stream's decode to the missing method)."""
    from flashmoe.models.context import NullTimer

    class Resident:
        capturable = True

        def graphed(self, x, ids, weights, residual):
            return ids

    stream = torch.tensor([[0, 1], [2, 3], [4, 5]])
    replay = ReplayExperts(Resident(), stream, NullTimer(), host_sync=False)
    assert replay.capturable
    seen = [replay.graphed(None, torch.zeros(1, 2, dtype=torch.long), None, None).tolist() for _ in range(4)]
    assert seen == [[[0, 1]], [[2, 3]], [[4, 5]], [[0, 1]]]
    assert not ReplayExperts(Resident(), stream, NullTimer(), host_sync=True).capturable


@pytest.mark.parametrize("host_sync", [True, False])
def test_a_spread_replay_gives_each_token_of_a_call_its_own_stream(host_sync):
    """A server's batch: the call's T tokens read rows `spread` apart, and every call moves them
    all on by one row, so each sequence keeps the stream's locality in its own tokens."""
    from flashmoe.models.context import NullTimer

    stream = torch.arange(8)[:, None].repeat(1, 2)  # row r: [r, r]
    replay = ReplayExperts(lambda x, ids, w, **out: ids, stream, NullTimer(), host_sync, spread=4)
    seen = [replay(None, torch.zeros(t, 2, dtype=torch.long), None)[:, 0].tolist() for t in (2, 2, 1, 3)]
    assert seen == [[0, 4], [1, 5], [2], [3, 7, 3]]  # cyclic past the end


def test_bench_replay_runs_the_decode_on_the_stream(packed16):
    from flashmoe.bench.probes import Bandwidths
    from flashmoe.bench.scenarios import fit_trace_replays, run_replayed_decode
    from flashmoe.engine import Engine, EngineConfig

    engine = Engine(packed16, EngineConfig(dtype="float32"))
    trace = RoutingTrace(topic_trace(400, 2, 8, 2), 8)
    generators, stats = fit_trace_replays(trace, 8, [2], log=lambda *_: None)
    assert stats["replay"][2]["load_entropy"] < 1 and len(stats["reuse"]) == len(L.WINDOWS)
    r = run_replayed_decode(engine, generators[2], 6, 4, layers_full=4, bw=Bandwidths(1e10, 1e11, 1e9), repeats=1)
    assert r.routing == "trace replay" and r.tokens == 3
    assert engine.experts[0].__class__.__name__ == "StreamedExperts"


def test_trace_file_round_trip_and_bad_files(tmp_path):
    trace = RoutingTrace(topic_trace(50, 3, 16, 4), 16, "m", "data.py")
    trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert (back.ids == trace.ids).all() and (back.num_experts, back.k, back.model, back.source) == (16, 4, "m", "data.py")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RoutingTrace.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TraceError, match="not a flashmoe routing trace"):
        RoutingTrace.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(TraceError, match="not a flashmoe routing trace"):
        RoutingTrace.load(tmp_path / "other.npz")
    with pytest.raises(TraceError, match=r"lie in \[0, 8\)"):
        RoutingTrace(trace.ids, 8)
    with pytest.raises(TraceError, match="same expert twice"):
        RoutingTrace(np.zeros((4, 1, 2), np.int16), 8)
    with pytest.raises(TraceError, match="recorded with 16 experts, k=4 .* needs 512 experts, k=10"):
        back.require(512, 10)
    back.require(16, 4)


def test_wrapped_experts_turn_the_cpu_paths_own_routing_off_meanwhile(packed4):
    """The CPU path's one-call MoE steps route by themselves: while a wrapper records or replays
    the routing they must not run, or it would see none of their tokens."""
    from flashmoe.engine import Engine, EngineConfig

    engine = Engine(packed4, EngineConfig(dtype="float32"))
    steps = engine.moe_steps
    assert any(steps)
    with wrapped_experts(engine, lambda i, inner: RecordingExperts(inner)) as recorders:
        assert engine.moe_steps == []
        engine.forward([5, 6, 7], state := engine.new_state())
        engine.forward([8], state)  # a decode token, which the MoE step would have taken
    assert all(len(r.ids) == 2 for r in recorders) and engine.moe_steps is steps
