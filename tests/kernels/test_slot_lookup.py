import pytest
import torch

from flashmoe.kernels.slot_lookup import lookup_slots, lookup_slots_reference


def random_table(layers: int, experts: int, seed: int) -> torch.Tensor:
    """Slots as resident decode's table holds them: GPU slots and host-relative ones (negative or
    past the pool), distinct per (layer, expert)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(layers * experts, generator=g) - layers * experts // 3).view(layers, experts)


# (1, 512, 10) is a 397B decode step; 3 x 7 ids are not a power of two (masked tail); 8 tokens of
# 6 of 12 experts share experts (repeats within one call).
@pytest.mark.parametrize("T,E,k", [(1, 16, 2), (3, 16, 7), (8, 12, 6), (1, 512, 10)])
def test_slots_and_counts_match_the_reference_across_calls(device, poison, T, E, k):
    g = torch.Generator().manual_seed(T * 100 + E + k)
    table = random_table(3, E, seed=E)
    uses, ref_uses = torch.zeros(3, E, dtype=torch.int64, device=device), torch.zeros(3, E, dtype=torch.int64)
    table_dev = table.to(device)
    for call in range(4):  # the counts accumulate over calls, as over decode steps
        layer = call % 3
        if call % 2:  # drawn with replacement: repeats inside a token's row too
            ids = torch.randint(0, E, (T, k), generator=g)
        else:  # as routed: k distinct experts per token
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        wide = torch.cat([ids, torch.randint(0, E, (T, 3), generator=g)], dim=1)  # sliced from wider rows
        slots = lookup_slots(table_dev[layer], uses[layer], wide.to(device)[:, :k])
        ref = lookup_slots_reference(table[layer], ref_uses[layer], ids)
        assert slots.dtype == table.dtype and torch.equal(slots.cpu(), ref)
        assert torch.equal(uses.cpu(), ref_uses), call


def test_repeated_ids_in_one_call_are_each_counted(device):
    table = torch.arange(100, 108, device=device)
    uses = torch.zeros(8, dtype=torch.int64, device=device)
    ids = torch.tensor([[3, 5], [3, 1], [3, 5]], device=device)
    assert lookup_slots(table, uses, ids).cpu().tolist() == [[103, 105], [103, 101], [103, 105]]
    assert uses.cpu().tolist() == [0, 1, 0, 3, 0, 2, 0, 0]


def test_lookup_refuses_what_it_does_not_support(device):
    table = torch.arange(8, device=device)
    with pytest.raises(ValueError, match="int64"):
        lookup_slots(table, torch.zeros(8, dtype=torch.int32, device=device), torch.zeros(1, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="unit column stride"):
        lookup_slots(table, torch.zeros(8, dtype=torch.int64, device=device), torch.zeros(2, 4, dtype=torch.long, device=device)[:, ::2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lookup_replays_from_a_cuda_graph():
    """As resident decode runs it: captured once, replayed with new ids in the captured buffer;
    the counts accumulate over replays."""
    table = random_table(2, 512, seed=1).cuda()
    uses = torch.zeros(2, 512, dtype=torch.int64, device="cuda")
    ids = torch.zeros(1, 10, dtype=torch.int64, device="cuda")
    lookup_slots(table[1], uses[1], ids)  # compile outside the capture
    uses.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slots = lookup_slots(table[1], uses[1], ids)
    ref_uses = torch.zeros(2, 512, dtype=torch.int64)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        step = torch.randperm(512, generator=g)[:10][None]
        ids.copy_(step)
        graph.replay()
        assert torch.equal(slots.cpu(), lookup_slots_reference(table[1].cpu(), ref_uses[1], step))
    assert torch.equal(uses.cpu(), ref_uses)
