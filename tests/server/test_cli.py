"""`flashmoe serve`'s benchmark routing (--replay-trace): each sequence of a batch follows its own
stream of the trace's locality, and the engine's routing is its own again afterwards."""

from flashmoe.analysis.routing_trace import ReplayExperts, RoutingTrace
from flashmoe.engine import Engine, EngineConfig
from flashmoe.server.cli import REPLAY_ROWS, _replayed
from tests.analysis.test_routing_trace import topic_trace


def test_a_replayed_trace_routes_each_sequence_of_a_batch_by_its_own_stream(packed16, tmp_path):
    engine = Engine(packed16, EngineConfig(dtype="float32"))
    steps = engine.moe_steps
    RoutingTrace(topic_trace(400, 2, 8, 2), 8).save(tmp_path / "t.npz")
    with _replayed(engine, tmp_path / "t.npz", parallel=4):
        replays = [engine.experts[i] for i in engine.moe_layers]
        assert all(isinstance(r, ReplayExperts) and r.spread == REPLAY_ROWS // 4 for r in replays)
        seen = []
        for r in replays:  # the ids each call hands the layer's experts
            inner = r.inner
            r.inner = lambda x, ids, w, inner=inner, **out: seen.append(ids.clone()) or inner(x, ids, w, **out)
        states = [engine.new_state() for _ in range(3)]
        engine.forward_batch([[5, 6], [7], [8, 9, 10]], states)  # a packed prefill: one call a layer
        engine.forward_batch([[1], [2], [3]], states)  # a decode step of the three
        assert [r.position for r in replays] == [2] * len(replays)  # each call moved the streams on by one row
        stream = replays[0].stream
        assert seen[len(replays)].tolist() == stream[[1, 1 + REPLAY_ROWS // 4, 1 + 2 * REPLAY_ROWS // 4]].tolist()
    assert not any(isinstance(e, ReplayExperts) for e in engine.experts) and engine.moe_steps is steps
