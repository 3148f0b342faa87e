"""How many threads the CPU path computes with: the cores the rest of the machine leaves free,
read again as generation runs.

PyTorch's OpenMP pool (and numba's, for the routed experts) hands each operation to every thread
and waits for the last. With more threads than free cores one of them is always descheduled, and
a decode step of a few thousand small operations waits for it thousands of times: two `flashmoe
demo` runs on a 2-core machine decoded at 1 tok/s each, against 71 for one alone. So the thread
count follows the cores that other processes leave idle, measured from /proc/stat between checks
(the machine's busy time less this process's own), unless the user fixed it (`--threads`).
"""

from __future__ import annotations

import os
import time
from typing import Callable

CHECK_SECONDS = 0.5  # how often the free cores are measured again while generating


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat), or None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is counted in user already


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadBudget:
    """The thread count for compute on the CPU: `fixed` if given, else the cores other processes
    leave free (at least one), re-measured at most every CHECK_SECONDS when `update` is called.
    `apply(n)` is called with each new count (it sets PyTorch's and the CPU kernel's threads)."""

    def __init__(self, apply: Callable[[int], None], fixed: int | None = None, cores: int | None = None,
                 clock: Callable[[], float] = time.monotonic, busy: Callable[[], float | None] = machine_busy_seconds,
                 own: Callable[[], float] = own_cpu_seconds) -> None:
        if fixed is not None and fixed < 1:
            raise ValueError(f"--threads must be at least 1, got {fixed}")
        self.cores = cores or usable_cores()
        self.fixed, self._apply = fixed, apply
        self._clock, self._busy, self._own = clock, busy, own
        self._last = (clock(), busy(), own())
        self.threads = fixed or self.cores
        apply(self.threads)

    def update(self) -> int:
        """Measure again if CHECK_SECONDS have passed; returns the thread count now in use."""
        if self.fixed is not None:
            return self.threads
        now = self._clock()
        then, busy_then, own_then = self._last
        if now - then < CHECK_SECONDS:  # the clock first: reading /proc/stat costs ~30 us, a decode step's 1%
            return self.threads
        busy, own = self._busy(), self._own()
        if busy is None or busy_then is None:
            return self.threads
        self._last = (now, busy, own)
        others = max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)  # cores kept busy by others
        threads = max(1, min(self.cores, round(self.cores - others)))
        if threads != self.threads:
            self.threads = threads
            self._apply(threads)
        return threads
