import shutil

import pytest
import torch

from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest
from flashmoe.experts.store import BudgetError, CorruptExpertError, ExpertStore, ExpertStoreError


def logits_for(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    state = engine.new_state()
    with torch.inference_mode():
        out = [engine.forward(ids, state, last_only=False)]
        for t in range(5):
            out.append(engine.forward(torch.tensor([t + 7]), state))
    return torch.cat(out)


def test_small_budget_gives_the_same_logits_and_counters_add_up(packed16):
    record = Manifest.load(packed16).layout.record_size
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(0))
    # one thread each: PyTorch's sums depend on the thread count, which otherwise follows the machine's load
    full = Engine(packed16, EngineConfig(dtype="float32", threads=1))
    small = Engine(packed16, EngineConfig(dtype="float32", host_mem=3 * record, threads=1))  # 3 of 32 experts, top-2
    assert small.store.capacity == 3 and not small.store.keeps_every_record
    assert torch.equal(logits_for(full, ids), logits_for(small, ids))
    s = small.store.stats
    assert s.evictions > 0 and s.misses > full.store.stats.misses
    assert s.bytes_read == s.misses * record
    # every lookup is a hit or a miss: prefill reads each needed expert once per layer, decode top-2 per layer
    assert s.hits + s.misses >= 4 * 2 * 5


def test_budget_below_one_tokens_working_set_is_refused(packed16):
    record = Manifest.load(packed16).layout.record_size
    with pytest.raises(BudgetError, match="raise --host-mem to at least"):
        Engine(packed16, EngineConfig(host_mem=record))  # top-2 needs 2 records


def test_eviction_under_pressure_never_serves_a_wrong_record(packed16):
    manifest = Manifest.load(packed16)
    rs = manifest.layout.record_size
    files = {f.layer: (packed16 / f.file).read_bytes() for f in manifest.expert_files}
    store = ExpertStore(packed16, manifest, budget_bytes=7 * rs, min_records=5)  # 2 cached + 5 staging
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        layer = int(torch.randint(0, 4, (1,), generator=g))
        experts = torch.randperm(8, generator=g)[: int(torch.randint(1, 6, (1,), generator=g))].tolist()
        seen = set()
        for e, record in store.load(layer, experts):
            seen.add(e)
            assert record.numpy().tobytes() == files[layer][e * rs : (e + 1) * rs]
        assert seen == set(experts)
    store.close()


def test_before_read_runs_once_before_a_read_and_never_for_cached_records(packed16):
    """The GPU tier waits for in-flight copies in this hook: only reads can overwrite their sources."""
    manifest = Manifest.load(packed16)
    store = ExpertStore(packed16, manifest, budget_bytes=8 * manifest.layout.record_size, min_records=4)
    calls = []
    for experts, expected in (([0, 1, 2], 1), ([0, 1, 2], 0), ([1, 3], 1)):
        before = store.stats.misses
        list(store.load(0, experts, before_read=lambda: calls.append(store.stats.misses)))
        assert len(calls) == expected
        if expected:
            assert calls.pop() == before + 1  # called at the first miss, before its read
    store.close()


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_expert_file_is_reported(packed16, tmp_path):
    d = copy_model(packed16, tmp_path / "m")
    f = d / "experts" / "layer_001.bin"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(ExpertStoreError, match="layer_001.bin.*truncated"):
        Engine(d)


def test_flipped_byte_names_layer_expert_and_file(packed16, tmp_path):
    d = copy_model(packed16, tmp_path / "m")
    manifest = Manifest.load(d)
    f = d / "experts" / "layer_002.bin"
    data = bytearray(f.read_bytes())
    data[5 * manifest.layout.record_size + 100] ^= 0x40
    f.write_bytes(bytes(data))
    store = ExpertStore(d, manifest, budget_bytes=8 * manifest.layout.record_size, min_records=2)
    assert [e for e, _ in store.load(2, [4])] == [4]  # a good record in the same file reads fine
    with pytest.raises(CorruptExpertError, match=r"layer 2 expert 5 in .*layer_002\.bin"):
        list(store.load(2, [5]))
    assert (2, 5) not in store.slots  # the bad record is not left in the cache
    unchecked = ExpertStore(d, manifest, budget_bytes=8 * manifest.layout.record_size, min_records=2, verify=False)
    assert [e for e, _ in unchecked.load(2, [5])] == [5]  # --no-verify skips the check


def test_result_does_not_depend_on_read_completion_order(packed16, monkeypatch):
    """Reads finish in any order; the routed sum must not (at 16-bit, summation order shows)."""
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    engine = Engine(packed16, EngineConfig(dtype="bfloat16"))
    first = logits_for(engine, ids)
    real_load = ExpertStore.load

    def reversed_load(self, layer, experts):
        yield from reversed(list(real_load(self, layer, experts)))

    monkeypatch.setattr(ExpertStore, "load", reversed_load)
    assert torch.equal(logits_for(engine, ids), first)


def test_the_default_budget_keeps_every_expert_beside_the_staging_slots(packed16):
    """Without --host-mem (and RAM to spare) every record has a slot of its own: the staging slots
    come on top, so a warm cache never misses (the CPU path's one-call MoE step needs every chosen
    expert cached)."""
    engine = Engine(packed16, EngineConfig(dtype="float32", threads=1))
    records = sum(f.num_experts for f in engine.manifest.expert_files)
    assert engine.store.capacity - engine.store.batch == records and engine.store.keeps_every_record
    assert any(c.endswith("(all of them)") for c in engine.choices)
