"""The generation thread: continuous batching over the engine, which is not thread-safe.

Every generation runs on this one thread. Jobs wait in a bounded FIFO queue (a full queue is the
caller's 503); up to `parallel` of them run at once. Each round admits waiting jobs into the free
places and advances every running job to its next forward (a ForwardRequest, after the events
before it went out): a decode step (its next token) or a slice of its prompt's prefill (at most
generation.PREFILL_SLICE tokens, so a long prompt delays the others' steps by one slice at a
time). The round's decode steps run together through the engine's `forward_batch`, so a layer
reads each expert the round's tokens need once, and so do its prefill slices, packed into
forwards of up to PREFILL_SLICE tokens: sixteen newcomers cost one prefill, not sixteen in turn.
A lone request runs as its generation would alone (CUDA graphs for a decode step on the GPU). A
job that ends or is cancelled (a client gone) leaves at the end of its round. A job's events reach
its asyncio consumer through `Job.events`, handed to the event loop once a round: before the
round's forwards on the CPU, and on the GPU once its decode step is launched, so the loop writes
them while the GPU computes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from ..generation import PREFILL_SLICE, ForwardRequest
from ..runtime.stats import Counters

log = logging.getLogger("flashmoe.server")

SLICE_TOKENS = 16  # events a job may post in one round without reaching a forward (work that does not batch)


class QueueFullError(Exception):
    pass


class Done:
    """The last event of a job that ran to its end."""


@dataclass(slots=True)
class Failed:
    """The last event of a job whose work raised."""

    error: BaseException


class Outbox:
    """Events the generation thread posts during a round, handed to each event loop in one call
    (`send`): one wake-up of the loop a round, where a call per event woke it once per stream and
    token, each wake-up a write to its self-pipe under the GIL."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}

    def add(self, job: Job, event: Any) -> None:
        self._pending.setdefault(job.loop, []).append((job, event))

    def send(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: the server is shutting down
                for job, _ in items:
                    job.cancel()


def _deliver(items: list[tuple[Job, Any]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


class Job:
    """One request's work: an iterator run on the generation thread; what it yields, then Done or
    Failed, arrives in `events` on the submitting event loop (through the scheduler's outbox, sent
    after each stage of a round)."""

    def __init__(self, work: Iterator[Any], loop: asyncio.AbstractEventLoop, outbox: Outbox) -> None:
        self.work = work
        self.order = -1  # when it was first admitted (the scheduler's count)
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.loop = loop
        self._outbox = outbox
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stops the job at its next step (or before it starts); its state is freed with it."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, event: Any) -> None:
        self._outbox.add(self, event)


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
    largest_batch: int  # the most sequences a round's decode steps advanced
    preempted: int  # sequences set aside (their state freed) for want of state memory, since the start
    paused: int  # ... and set aside now, to be recomputed when there is room


@dataclass(slots=True)
class DecodeStats(Counters):
    """What the rounds' decode steps read and how long they took, from the engine's counters taken
    around each step (the prefills between them are not counted): expert bytes per decoded token,
    which a batch lowers where its tokens share experts; and a round's time beside its forward's,
    the rest being the host's work per round (the jobs' bookkeeping, their events handed over)."""

    tokens: int = 0  # sequence steps decoded: a round of 8 sequences decodes 8
    # Expert records the expert store handed out (RAM hits and disk reads): on the CPU path the
    # records the step computed, each once; on the GPU path the records copied to the GPU. Not
    # counted: the GPU tier's hits, what resident decode reads in place (its device counters count
    # lookups per token, not reads) and the records a CPU share computes where they lie.
    expert_records: int = 0
    expert_bytes: int = 0  # ... their bytes
    disk_bytes: int = 0  # ... of them read from disk
    gpu_bytes_copied: int = 0  # host -> GPU copies of expert records (GPU tier; 0 without one)
    rounds: int = 0  # rounds that ran decode steps
    round_seconds: float = 0.0  # their wall time, less their prefill slices'
    forward_seconds: float = 0.0  # ... of which in the decode forwards (the argmax read back; on the GPU the events' hand-over)


class Scheduler:
    def __init__(self, parallel: int = 4, max_queue: int = 32, engine: Any = None, state_mem: int | None = None) -> None:
        """engine: runs a round's decode steps together (Engine.forward_batch), and frees and rebuilds
        a preempted sequence's state (release, recompute). state_mem: bytes the running sequences'
        states may take at a decode step; past it the newest are preempted, their state freed,
        and brought back (prefilled again from their tokens) oldest first when they fit."""
        if parallel < 1 or max_queue < 0:
            raise ValueError("parallel must be at least 1 and max_queue at least 0")
        if state_mem is not None and (state_mem <= 0 or engine is None):
            raise ValueError("state_mem must be a positive size, with an engine to free and rebuild states")
        self.parallel, self.max_queue, self.engine, self.state_mem = parallel, max_queue, engine, state_mem
        # Where a forward runs on the GPU, a round's events (the last forward's tokens) go out once
        # its decode step is launched: the event loop then formats and writes them while the GPU
        # computes and this thread waits for it with the GIL released. Sent before the launch, the
        # woken loop took the GIL from the launch's own Python (on the H100 at 16 streams, 15% of
        # this thread's samples sat in the step's non-blocking copy, the first call after the send
        # that gives the GIL up: EXPERIMENTS 117).
        # On the CPU the forward is the computation itself, so they go out before it.
        self.forwards_run_async = engine is not None and engine.device.type != "cpu"
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []  # in order of first admission: the newest last
        self._preempted: deque[tuple[Job, ForwardRequest, int]] = deque()  # (job, its step, its state's bytes then)
        self._admitted = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._completed = self._cancelled = self._failed = self._rejected = self._largest_batch = 0
        self._preemptions = 0
        self._decode_stats = DecodeStats()
        self._outbox = Outbox()  # the generation thread's alone
        self._thread = threading.Thread(target=self._run, name="flashmoe-generate", daemon=True)
        self._thread.start()

    def submit(self, work: Iterator[Any], loop: asyncio.AbstractEventLoop) -> Job:
        """Queues `work`; QueueFullError when `parallel` jobs run and `max_queue` more wait already."""
        job = Job(work, loop, self._outbox)
        with self._cv:
            queued = len(self._active) + len(self._preempted) + len(self._waiting)
            if self._closed or queued >= self.parallel + self.max_queue:
                self._rejected += 1
                raise QueueFullError
            self._waiting.append(job)
            self._cv.notify()
        return job

    def stats(self) -> SchedulerStats:
        with self._cv:
            return SchedulerStats(len(self._active), len(self._waiting), self.parallel, self.max_queue, self._completed,
                                  self._cancelled, self._failed, self._rejected, self._largest_batch,
                                  self._preemptions, len(self._preempted))

    def decode_stats(self) -> DecodeStats:
        with self._cv:
            return replace(self._decode_stats)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in (*self._active, *(job for job, _, _ in self._preempted), *self._waiting):
                job.cancel()
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._active and not self._preempted and not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed and not self._active and not self._preempted and not self._waiting:
                    return
                # a newcomer waits while a preempted sequence does: it would take the room that one needs
                while self._waiting and not self._preempted and len(self._active) < self.parallel:
                    job = self._waiting.popleft()
                    job.order = next(self._admitted)
                    self._active.append(job)
                jobs = list(self._active)
            start = time.perf_counter()
            ended, requests = [], []
            for job in jobs:
                outcome = self._advance(job)
                if isinstance(outcome, ForwardRequest):
                    requests.append((job, outcome))
                elif outcome:
                    ended.append(job)
            steps = [(job, r) for job, r in requests if not r.prefill]
            if self.state_mem is not None:
                steps = self._within_state_memory(steps)
            if not (steps and self.forwards_run_async):
                self._outbox.send()  # the tokens of the last forward, before the next one runs
            ended += self._decode(steps)  # on the GPU it sends them once its forward is launched
            prefill_start = time.perf_counter()
            ended += self._prefill([(job, r) for job, r in requests if r.prefill])
            prefill_seconds = time.perf_counter() - prefill_start
            self._outbox.send()  # failures of this round's forwards
            with self._cv:
                for job in ended:
                    self._active.remove(job)
                if steps:
                    self._decode_stats.round_seconds += time.perf_counter() - start - prefill_seconds

    def _within_state_memory(self, steps: list[tuple[Job, ForwardRequest]]) -> list[tuple[Job, ForwardRequest]]:
        """The round's decode steps with the preempted sequences that fit back in (oldest first,
        their states recomputed) and without the newest while the states exceed state_mem (one
        always runs); those are set aside, their states freed."""
        from ..runtime.prefix_cache import state_bytes

        used = sum(state_bytes(request.state) for _, request in steps)
        while self._preempted:
            job, request, size = self._preempted[0]
            if job.cancelled:
                self._preempted.popleft()
                self._close(job)
                self._count("_cancelled")
                continue
            if steps and used + size > self.state_mem:
                break
            self._preempted.popleft()
            try:
                self.engine.recompute(request.state)
            except Exception as e:  # reported to its client; the others go on
                log.exception("recomputing a preempted sequence failed")
                job.post(Failed(e))
                self._count("_failed")
                continue
            used += state_bytes(request.state)
            with self._cv:
                self._active.append(job)
                self._active.sort(key=lambda j: j.order)
            steps.append((job, request))
        steps.sort(key=lambda step: step[0].order)
        while len(steps) > 1 and used > self.state_mem:
            job, request = steps.pop()  # the newest
            size = state_bytes(request.state)
            used -= size
            self.engine.release(request.state)
            with self._cv:
                self._active.remove(job)
                self._preempted.appendleft((job, request, size))  # brought back in order: oldest first
                self._preemptions += 1
        return steps

    def _decode(self, steps: list[tuple[Job, ForwardRequest]]) -> list[Job]:
        """Run the round's decode steps, together where there are several; the jobs whose step failed."""
        if not steps:
            return []
        with self._cv:
            self._decode_stats.rounds += 1
            self._largest_batch = max(self._largest_batch, len(steps))
        before = self.engine.counters() if self.engine is not None else None
        start = time.perf_counter()
        launched = self._outbox.send if self.forwards_run_async else lambda: None
        failed = self._run_together(steps, argmax=True, launched=launched)
        seconds = time.perf_counter() - start
        if before is not None and not failed:
            self._count_reads(before, len(steps))
        with self._cv:
            self._decode_stats.forward_seconds += seconds
        return failed

    def _prefill(self, slices: list[tuple[Job, ForwardRequest]]) -> list[Job]:
        """Run the round's prefill slices, in order, packed into forwards of up to PREFILL_SLICE
        tokens; the jobs whose forward failed."""
        failed, group, tokens = [], [], 0
        for job, request in slices:
            if group and tokens + len(request.tokens) > PREFILL_SLICE:
                failed += self._run_together(group)
                group, tokens = [], 0
            group.append((job, request))
            tokens += len(request.tokens)
        return failed + (self._run_together(group) if group else [])

    def _run_together(self, requests: list[tuple[Job, ForwardRequest]], argmax: bool = False,
                      launched: Callable[[], None] = lambda: None) -> list[Job]:
        """One forward for the requests (each runs alone where it is the only one); with `argmax`,
        each row's most likely token read in one host sync for the batch's greedy draws;
        `launched` called once the forward is queued, before anything waits for it. The jobs whose
        requests failed: all of them, reported to each client; the thread goes on."""
        try:
            if len(requests) == 1 or self.engine is None:
                for _, request in requests:
                    request.logits = request.alone()
                launched()
                return []
            start = time.perf_counter()
            logits = self.engine.forward_batch([r.tokens for _, r in requests], [r.state for _, r in requests])
            if requests[0][1].prefill:
                self.engine.settle("prefill")  # as a prefill alone does: the resident experts' lookups counted
            launched()
            best = logits.argmax(-1).tolist() if argmax else [None] * len(requests)
            seconds = time.perf_counter() - start
            for i, (_, request) in enumerate(requests):
                request.logits, request.argmax, request.seconds = logits[i : i + 1], best[i], seconds
            return []
        except Exception as e:
            launched()
            log.exception("a batched forward failed")
            for job, _ in requests:
                job.post(Failed(e))
                self._close(job)
                self._count("_failed")
            return [job for job, _ in requests]

    def _count_reads(self, before: tuple, tokens: int) -> None:
        (store, gpu, _), (store_now, gpu_now, _) = before, self.engine.counters()
        records = (store_now.hits + store_now.misses) - (store.hits + store.misses)
        copied = gpu_now.bytes_copied - gpu.bytes_copied if gpu is not None else 0
        step = DecodeStats(tokens, records, records * self.engine.manifest.layout.record_size,
                           store_now.bytes_read - store.bytes_read, copied)
        with self._cv:
            self._decode_stats += step

    def _advance(self, job: Job) -> bool | ForwardRequest:
        """Runs `job` to its next forward (returned, for `_decode` or `_prefill`), or up to
        SLICE_TOKENS events of work that does not batch; True once it has ended (or was cancelled)."""
        for _ in range(SLICE_TOKENS):
            if job.cancelled:
                self._close(job)
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
            if isinstance(event, ForwardRequest):
                return event
            job.post(event)
        return False

    @staticmethod
    def _close(job: Job) -> None:
        close = getattr(job.work, "close", None)
        if close is not None:
            close()  # runs the work's cleanup now, on this thread

    def _count(self, name: str) -> None:
        with self._cv:
            setattr(self, name, getattr(self, name) + 1)
