"""Wall-clock accounting by section (mixer, routing, expert I/O, ...), for the live summary."""

from __future__ import annotations

import time
from collections import defaultdict


class _Section:
    __slots__ = ("timer", "name", "t0")

    def __init__(self, timer: "Timer", name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.timer.sync is not None:
            self.timer.sync()
        self.timer.seconds[self.name] += time.perf_counter() - self.t0
        return False


class Timer:
    """Sums wall time per named section. On CPU the wall clock is the truth; asynchronous devices
    need a synchronize at each boundary for the split to mean anything, which `sync` provides."""

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    def section(self, name: str) -> _Section:
        if self.sync is not None:
            self.sync()
        return _Section(self, name)
