import pytest
import torch

from flashmoe.experts.cpu_share import SPLIT_MARGIN, Split, link_seconds, measure_split, split_counts
from flashmoe.kernels.cpu_expert_server import MAX_EXPERTS


def brute_force(cpu: list[float], link: float, n: int) -> float:
    """The fastest finish of n host-resident experts over every split (None of the margin's rule)."""
    return min(max(cpu[c - 1] if c else 0.0, (n - c) * link) for c in range(min(n, len(cpu)) + 1))


@pytest.mark.parametrize("seed", range(4))
def test_split_counts_finish_within_the_margin_of_the_best_split(seed):
    g = torch.Generator().manual_seed(seed)
    fixed, per_expert = torch.rand(2, generator=g).tolist()
    cpu = [1e-4 * (fixed + c * per_expert * 4) for c in range(1, 11)]  # a call's fixed cost, then a cost per expert
    link = 1e-4 * float(torch.rand(1, generator=g)) + 1e-6
    counts = split_counts(cpu, link, 10)
    assert len(counts) == 11 and counts[0] == 0
    for n, c in enumerate(counts):
        assert 0 <= c <= n
        finish = max(cpu[c - 1] if c else 0.0, (n - c) * link)
        assert finish <= brute_force(cpu, link, n) / SPLIT_MARGIN + 1e-15


def test_split_follows_the_rates():
    cpu = [1.0, 2.0, 3.0, 4.0]  # one expert a second
    assert split_counts(cpu, 1.0, 4) == (0, 0, 1, 1, 2)  # equal rates: half each, the CPU's when it finishes first
    assert split_counts(cpu, 100.0, 4) == (0, 1, 2, 3, 4)  # a slow link: the CPU takes all it measured
    assert split_counts(cpu, 0.01, 4) == (0,) * 5  # a fast link: none
    assert split_counts(cpu[:2], 100.0, 4) == (0, 1, 2, 2, 2)  # never more than it measured
    # a split that gains less than the margin stays on the link
    assert split_counts([1.0], 1.0 / SPLIT_MARGIN - 1e-3, 1) == (0, 0)
    assert split_counts([1.0], 1.0 / SPLIT_MARGIN + 1e-3, 1) == (0, 1)


def test_split_takes_from_its_table_up_to_the_limit():
    split = Split((0, 1, 1, 2), (1.0, 2.0), 1.0)
    assert [split.take(n, 4) for n in range(7)] == [0, 1, 1, 2, 2, 2, 2]  # past the table: its last entry
    assert [split.take(n, 1) for n in range(5)] == [0, 1, 1, 1, 1]
    assert "the CPU takes [0, 1, 1, 2]" in split.describe(4096)
    assert "takes none" in Split((0, 0), (), 1.0).describe(4096)  # nothing in the host tier to time


def test_measure_split_times_each_count_on_distinct_records():
    pool = torch.zeros(20, 64, dtype=torch.uint8)
    asked = []
    split = measure_split(asked.append, pool, list(range(3, 20)), "cpu", k=4, repeats=3)
    assert [len(a) for a in asked] == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert all(len(set(a)) == len(a) and set(a) <= set(range(3, 20)) for a in asked)
    assert len(split.cpu_seconds) == 4 and split.link_seconds > 0 and len(split.counts) == 5
    assert len(measure_split(asked.append, pool, list(range(20)), "cpu", k=40, repeats=1).cpu_seconds) == MAX_EXPERTS


def test_a_record_over_the_link_costs_the_slope_of_the_copies():
    """What one more record adds, not a copy's fixed cost (timed here on the CPU: a noisy machine
    can make the slope of tiny records negative, which clamps to 1 ns)."""
    from flashmoe.experts.cpu_share import per_record

    assert per_record(0.003, 0.010, 8) == pytest.approx(0.001)
    assert per_record(0.003, 0.002, 8) == 1e-9 and per_record(0.004, 0.0, 1) == 0.004
    assert link_seconds(torch.zeros(8, 1 << 16, dtype=torch.uint8), "cpu", 3) > 0


def test_a_cold_store_is_timed_on_zero_records_not_on_unwritten_slots():
    """Unwritten host slots may hold anything (NaN scales made the CPU kernel raise); until the store
    holds k records the CPU is timed on zero records instead."""
    from types import SimpleNamespace

    from flashmoe.experts.cpu_share import timing_records

    pool = torch.full((6, 64), 0xFF, dtype=torch.uint8)
    cold = SimpleNamespace(pool=pool, slots=SimpleNamespace(slot_of={(0, 1): 2}))
    timed, rows = timing_records(cold, 4)
    assert timed is not pool and not timed.any() and timed.shape == (4, 64) and rows == [0, 1, 2, 3]
    warm = SimpleNamespace(pool=pool, slots=SimpleNamespace(slot_of={(0, e): e for e in range(5)}))
    timed, rows = timing_records(warm, 4)
    assert timed is pool and rows == [0, 1, 2, 3, 4]
