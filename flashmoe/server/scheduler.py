"""The generation thread: the engine runs one step at a time, for one job at a time.

The engine is single-sequence and not thread-safe, so every generation runs on this one thread.
Jobs wait in a bounded FIFO queue (a full queue is the caller's 503); up to `parallel` admitted
jobs take turns, a slice of tokens each, so a long answer does not hold back everyone else's
first tokens. A slice of several tokens rather than one keeps each sequence's experts warm in
the cache between its steps. A job's events reach its asyncio consumer through `Job.events`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("flashmoe.server")

SLICE_TOKENS = 16


class QueueFullError(Exception):
    pass


class Done:
    """The last event of a job that ran to its end."""


@dataclass(slots=True)
class Failed:
    """The last event of a job whose work raised."""

    error: BaseException


class Job:
    """One request's work: an iterator run on the generation thread; what it yields, then Done or
    Failed, arrives in `events` on the submitting event loop."""

    def __init__(self, work: Iterator[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stops the job at its next step (or before it starts); its state is freed with it."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()


@dataclass(slots=True)
class SchedulerStats:
    active: int
    waiting: int
    parallel: int
    max_queue: int
    completed: int
    cancelled: int
    failed: int
    rejected: int


class Scheduler:
    def __init__(self, parallel: int = 4, max_queue: int = 32) -> None:
        if parallel < 1 or max_queue < 0:
            raise ValueError("parallel must be at least 1 and max_queue at least 0")
        self.parallel, self.max_queue = parallel, max_queue
        self._waiting: deque[Job] = deque()
        self._active: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._completed = self._cancelled = self._failed = self._rejected = 0
        self._thread = threading.Thread(target=self._run, name="flashmoe-generate", daemon=True)
        self._thread.start()

    def submit(self, work: Iterator[Any], loop: asyncio.AbstractEventLoop) -> Job:
        """Queues `work`; QueueFullError when `parallel` jobs run and `max_queue` more wait already."""
        job = Job(work, loop)
        with self._cv:
            if self._closed or len(self._active) + len(self._waiting) >= self.parallel + self.max_queue:
                self._rejected += 1
                raise QueueFullError
            self._waiting.append(job)
            self._cv.notify()
        return job

    def stats(self) -> SchedulerStats:
        with self._cv:
            return SchedulerStats(len(self._active), len(self._waiting), self.parallel, self.max_queue,
                                  self._completed, self._cancelled, self._failed, self._rejected)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in (*self._active, *self._waiting):
                job.cancel()
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._active and not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed and not self._active and not self._waiting:
                    return
                while self._waiting and len(self._active) < self.parallel:
                    self._active.append(self._waiting.popleft())
                job = self._active[0]
            finished = self._advance(job)
            with self._cv:
                self._active.popleft()
                if not finished:
                    self._active.append(job)

    def _advance(self, job: Job) -> bool:
        """Runs up to SLICE_TOKENS steps of `job`; True once it has ended (or was cancelled)."""
        for _ in range(SLICE_TOKENS):
            if job.cancelled:
                close = getattr(job.work, "close", None)
                if close is not None:
                    close()  # runs the work's cleanup now, on this thread
                self._count("_cancelled")
                return True
            try:
                event = next(job.work)
            except StopIteration:
                job.post(Done())
                self._count("_completed")
                return True
            except Exception as e:  # reported to the client; the thread serves the next job
                log.exception("generation failed")
                job.post(Failed(e))
                self._count("_failed")
                return True
            job.post(event)
        return False

    def _count(self, name: str) -> None:
        with self._cv:
            setattr(self, name, getattr(self, name) + 1)
