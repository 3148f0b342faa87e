"""The CPU path's thread count follows the cores other processes leave free."""

import pytest

from flashmoe.runtime.threads import CHECK_SECONDS, ThreadBudget, machine_busy_seconds


class FakeMachine:
    """A 4-core machine: `run(seconds, others, ours)` advances time with `others` cores kept busy
    by other processes and `ours` by this one."""

    def __init__(self) -> None:
        self.now = self.busy = self.own = 0.0

    def run(self, seconds: float, others: float, ours: float) -> None:
        self.now += seconds
        self.busy += seconds * (others + ours)
        self.own += seconds * ours

    def budget(self, **kw) -> tuple[ThreadBudget, list[int]]:
        applied: list[int] = []
        budget = ThreadBudget(applied.append, cores=4, clock=lambda: self.now, busy=lambda: self.busy,
                              own=lambda: self.own, **kw)
        return budget, applied


def test_threads_shrink_to_the_cores_others_leave_and_grow_back():
    m = FakeMachine()
    budget, applied = m.budget()
    assert applied == [4]  # nothing measured yet: every core
    m.run(CHECK_SECONDS, others=1.0, ours=3.0)
    assert budget.update() == 3
    m.run(CHECK_SECONDS, others=2.7, ours=1.3)  # a second busy process starts
    assert budget.update() == 1
    m.run(CHECK_SECONDS / 2, others=0.0, ours=1.0)
    assert budget.update() == 1  # not measured again before CHECK_SECONDS
    m.run(CHECK_SECONDS, others=0.2, ours=1.0)  # they stop; light background load remains
    assert budget.update() == 4
    m.run(CHECK_SECONDS, others=9.0, ours=0.5)  # more work than cores: still one thread
    assert budget.update() == 1
    assert applied == [4, 3, 1, 4, 1]  # each change applied once


def test_a_fixed_count_is_kept_whatever_the_load():
    m = FakeMachine()
    budget, applied = m.budget(fixed=2)
    m.run(1.0, others=4.0, ours=0.0)
    assert budget.update() == 2 and applied == [2]
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        m.budget(fixed=0)


def test_an_unreadable_proc_stat_keeps_the_count():
    m = FakeMachine()
    applied: list[int] = []
    budget = ThreadBudget(applied.append, cores=2, clock=lambda: m.now, busy=lambda: None, own=lambda: 0.0)
    m.run(1.0, others=2.0, ours=0.0)
    assert budget.update() == 2 and applied == [2]


def test_this_machine_reports_busy_time():
    first = machine_busy_seconds()
    sum(i * i for i in range(200_000))  # some work of our own
    assert first is not None and machine_busy_seconds() >= first
