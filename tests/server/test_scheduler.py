"""The scheduler's rounds: newcomers' prefill slices packed into forwards, alone where alone."""

from __future__ import annotations

import asyncio

import torch

from flashmoe.generation import PREFILL_SLICE, ForwardRequest
from flashmoe.server.scheduler import Failed, Job, Outbox, Scheduler


class Recorder:
    """An engine that records the lengths of each forward_batch call's sequences."""

    device = torch.device("cpu")

    def __init__(self, fail: bool = False):
        self.calls: list[list[int]] = []
        self.fail = fail

    def forward_batch(self, ids, states):
        self.calls.append([len(seq) for seq in ids])
        if self.fail:
            raise RuntimeError("out of memory")
        return torch.arange(len(ids), dtype=torch.float32)[:, None].expand(len(ids), 3)

    def settle(self, phase: str) -> None:
        assert phase == "prefill"


def slices(lengths: list[int], loop, outbox: Outbox) -> tuple[list[tuple[Job, ForwardRequest]], list[str]]:
    alone: list[str] = []
    out = []
    for i, n in enumerate(lengths):
        request = ForwardRequest([7] * n, object(), lambda i=i: (alone.append(i), torch.full((1, 3), -1.0))[1], prefill=True)
        out.append((Job(iter(()), loop, outbox), request))
    return out, alone


def test_a_rounds_prefill_slices_are_packed_into_forwards_of_a_slice_at_most():
    loop = asyncio.new_event_loop()
    engine = Recorder()
    scheduler = Scheduler(parallel=8, engine=engine)
    try:
        half = PREFILL_SLICE // 2
        requests, alone = slices([30, 5, half, half, PREFILL_SLICE, 9, 3], loop, Outbox())
        assert scheduler._prefill(requests) == []
        # in order: 30 + 5 + half fit, the next half does not and runs alone, as does a whole slice
        assert engine.calls == [[30, 5, half], [9, 3]] and alone == [3, 4]
        assert [r.logits[0, 0].item() for _, r in requests] == [0, 1, 2, -1, -1, 0, 1]
        assert all(r.seconds > 0 for i, (_, r) in enumerate(requests) if i not in (3, 4))
    finally:
        scheduler.close()
        loop.close()


def test_a_failed_packed_prefill_fails_each_of_its_jobs_and_only_them():
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(parallel=8, engine=Recorder(fail=True))
    try:
        outbox = Outbox()
        requests, _ = slices([4, 4, PREFILL_SLICE], loop, outbox)
        assert scheduler._prefill(requests) == [requests[0][0], requests[1][0]]
        outbox.send()
        loop.run_until_complete(asyncio.sleep(0))  # the posted events arrive
        events = [job.events.get_nowait() if not job.events.empty() else None for job, _ in requests]
        assert isinstance(events[0], Failed) and isinstance(events[1], Failed) and events[2] is None
        assert scheduler.stats().failed == 2
    finally:
        scheduler.close()
        loop.close()


def test_a_rounds_events_wake_each_event_loop_once(monkeypatch):
    """Four jobs that post three events each and end: every event arrives, in each job's order,
    through one call of the loop a round (the events posted before and after each round's forwards),
    not one per event."""
    loop = asyncio.new_event_loop()
    calls = []
    real = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda f, *a: (calls.append(f), real(f, *a))[1])
    scheduler = Scheduler(parallel=4)
    try:
        jobs = [scheduler.submit(iter([(i, 0), (i, 1), (i, 2)]), loop) for i in range(4)]

        async def drain(job):
            return [await job.events.get() for _ in range(4)]

        async def all_events():
            return await asyncio.wait_for(asyncio.gather(*map(drain, jobs)), 10)

        got = loop.run_until_complete(all_events())
        for i, events in enumerate(got):
            assert events[:3] == [(i, 0), (i, 1), (i, 2)] and type(events[3]).__name__ == "Done"
        assert 1 <= len(calls) <= 4  # a round or a few (the jobs may be admitted in different rounds); 16 before
    finally:
        scheduler.close()
        loop.close()


def test_on_the_gpu_a_rounds_events_go_out_once_its_decode_step_is_launched(monkeypatch):
    """A GPU forward is queued, not run, when forward_batch returns: the round's events (the last
    tokens) are handed to the event loop then, before the argmax read waits for the GPU, so the
    loop writes them while the GPU computes. On the CPU they went out before the forward."""
    from types import SimpleNamespace

    from flashmoe.experts.store import StoreStats

    order: list[str] = []

    class Logits:  # records when the batch's argmax is read (the wait for the GPU)
        def argmax(self, dim):
            order.append("read")
            return torch.zeros(2, dtype=torch.long)

        def __getitem__(self, rows):
            return torch.zeros(1, 3)

    class Engine(Recorder):
        manifest = SimpleNamespace(layout=SimpleNamespace(record_size=1))

        def forward_batch(self, ids, states):
            order.append("launch")
            return Logits()

        def counters(self):
            return StoreStats(), None, None

    loop = asyncio.new_event_loop()
    for device, expected in (("cuda", ["launch", "send", "read"]), ("cpu", ["launch", "read"])):
        engine = Engine()
        engine.device = torch.device(device)
        scheduler = Scheduler(parallel=4, engine=engine)
        try:
            monkeypatch.setattr(scheduler._outbox, "send", lambda: order.append("send"))
            steps = [(Job(iter(()), loop, scheduler._outbox), ForwardRequest([5], object(), None)) for _ in range(2)]
            order.clear()
            assert scheduler._decode(steps) == []
            assert order == expected, device
            assert [r.argmax for _, r in steps] == [0, 0]
        finally:
            scheduler.close()
    loop.close()
