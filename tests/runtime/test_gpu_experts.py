"""The GPU path's expert logic (tiers, admission, staging, decode kernels, grouped prefill) against
the CPU path. Without a GPU it runs on the CPU with the kernels in Triton's interpreter."""

import pytest
import torch

from flashmoe.engine import Engine
from flashmoe.formats.packed import Manifest

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(engine, ids, steps=4):
    state = engine.new_state()
    with torch.inference_mode():
        out = [engine.model(ids.to(engine.device), state, last_only=False).cpu()]
        for t in range(steps):
            out.append(engine.model(torch.tensor([t + 3], device=engine.device), state).cpu())
    return torch.cat(out)


@pytest.mark.parametrize("policy", ["lru", "mix", "static"])
def test_gpu_path_matches_cpu_path_under_cache_pressure(packed16, policy):
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(2))  # > 8 tokens: grouped prefill
    reference = run(Engine(packed16, dtype=torch.float32), ids)
    record = Manifest.load(packed16).layout.record_size
    engine = Engine(packed16, device=DEVICE, dtype=torch.float32, host_mem=4 * record)
    engine.use_gpu_experts(gpu_mem=3 * record, policy=policy)  # 3 of 32 experts cached on the "GPU"
    got = run(engine, ids)
    assert float((got - reference).norm() / reference.norm()) < 1e-4
    tier = engine.gpu_tier.stats
    assert tier.misses > 0 and tier.bytes_copied == tier.misses * record
    if policy == "static":
        assert tier.admitted == 3  # filled once, never replaced


def test_preload_places_experts_and_counts_start_fresh(packed16):
    record = Manifest.load(packed16).layout.record_size
    engine = Engine(packed16, device=DEVICE, dtype=torch.float32)
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
    from flashmoe.runtime import gpu_experts

    engine = Engine(packed16, device=DEVICE, dtype=torch.float32)

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_experts.torch, "empty", no_memory)
    with pytest.raises(GpuMemoryError, match="lower --gpu-mem"):
        engine.use_gpu_experts(gpu_mem=4 << 20)
    monkeypatch.undo()
    monkeypatch.setattr(engine.model, "forward", no_memory)
    with pytest.raises(GpuMemoryError, match="lower --gpu-mem.*chunks of 2048"):
        list(engine.generate([1, 2, 3]))
