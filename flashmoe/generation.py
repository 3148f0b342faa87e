"""The generation loop over an Engine: prefill, then one sampled token at a time, streamed as Steps
with timing and cache statistics. Decode steps replay CUDA graphs on the GPU (runtime/graphs.py)."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .experts.store import StoreStats
from .runtime.sampling import Sampler, SamplingParams, token_logprobs
from .runtime.ngram_rows import NgramStats
from .runtime.stats import GpuTierStats
from .utils import peak_rss_bytes

if TYPE_CHECKING:
    from .engine import Engine
    from .layers.state import SequenceState

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class ContextLengthError(ValueError):
    pass


# Prompt tokens a batched generation asks to prefill at once: the other sequences' decode steps
# wait for at most this much of a newcomer's prompt between two of theirs (the scheduler packs
# the slices of several newcomers into one forward up to this many tokens). Each slice reads its
# experts again: a 3000-token prompt of the demo model took 1.52 s whole, 1.71 s in slices of 1024,
# 3.01 s in slices of 256 (docs/EXPERIMENTS.md entry 72).
PREFILL_SLICE = 1024


@dataclass(slots=True)
class ForwardRequest:
    """What a batched generation yields in place of running a forward itself: `tokens` to feed
    `state` (at a decode step its next token; with `prefill`, a slice of its prompt), for a
    caller that runs the requests of several generations at once (the server's scheduler, through
    Engine.forward_batch) and fills in `logits` [1, vocab] (of the last token) before resuming it,
    and `seconds`: the wall time of the batched forward, which the generation's statistics charge
    to its prefill or decode (each sequence of a batch waited the whole forward), and `argmax`:
    the row's most likely token where the caller read every row's at once (one host sync for the
    batch instead of one per sequence; a greedy sampler takes it). `alone()` runs the forward as
    the generation would by itself (CUDA graphs for a decode step on the GPU; timed by the
    generation): for a request that has no company."""

    tokens: list[int]
    state: "SequenceState"
    alone: Callable[[], torch.Tensor]
    prefill: bool = False
    logits: torch.Tensor | None = None
    seconds: float = 0.0
    argmax: int | None = None


@dataclass(slots=True)
class Step:
    """One generated token: its id, the text it completes (may be empty while a character or a
    possible stop string is still incomplete), and why generation ended, if it did."""

    token: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    # Only when SamplingParams.logprobs asks (token_logprobs says of which distribution): the
    # token's log-probability and the most likely (token id, log-probability) pairs.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_sections: dict[str, float] = field(default_factory=dict)  # seconds per section, summed over decode
    prefill_cache: StoreStats = field(default_factory=StoreStats)  # expert-store counters during prefill
    cache: StoreStats = field(default_factory=StoreStats)  # ... and during decode
    gpu_cache: GpuTierStats = field(default_factory=GpuTierStats)  # GPU tier counters during decode (GPU path)
    prefill_ngrams: NgramStats = field(default_factory=NgramStats)  # n-gram row reads during prefill (qwen4_exp)
    ngrams: NgramStats = field(default_factory=NgramStats)  # ... and during decode
    peak_rss: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Generation:
    def __init__(self, engine: Engine, prompt, params: SamplingParams, state: SequenceState | None, logits_processor,
                 batched: bool = False, checkpoints: dict[int, Callable[[], None]] | None = None):
        self.engine, self.params, self.logits_processor, self.batched = engine, params, logits_processor, batched
        self.checkpoints = checkpoints or {}  # prompt tokens -> called once the prefill has fed that many
        self.ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.state = state or engine.new_state()
        if not self.ids:
            raise ValueError("the prompt is empty")
        limit = engine.context_length
        used = self.state.position + len(self.ids)
        if used >= limit:
            raise ContextLengthError(
                f"the prompt needs {used} tokens of context but the model's context length is {limit}; shorten it"
            )
        self.max_tokens = min(params.max_tokens, limit - used)
        self.stats = GenerationStats(prompt_tokens=len(self.ids))

    def __iter__(self) -> Iterator[Step | ForwardRequest]:
        """Steps; with `batched`, a ForwardRequest for each slice of the prefill and each decode
        step, to be run by the caller."""
        return self._run()

    def _run(self) -> Iterator[Step | ForwardRequest]:
        eng = self.engine
        sampler = Sampler(self.params, eng.args.vocab_size, eng.device, seen=self.ids)
        generated: list[int] = []
        text = _StopStrings(self.params.stop)
        decoder = eng.tokenizer.stream_decoder()
        graphs = None

        def prefill(start: int, end: int) -> torch.Tensor:
            with self._measured(prefill=True):
                return eng.forward(self.ids[start:end], self.state)

        def decode(token: int, n: int) -> torch.Tensor:
            """The decode step of `token`, the n-th generated, as this generation runs it alone."""
            nonlocal graphs
            with self._measured(prefill=False):
                if self.state.slot is not None:  # a pool slot's state: the pool's graphs (Engine.forward_batch)
                    return eng.forward_batch([[token]], [self.state])
                if graphs is not None and not graphs.valid():  # new buffers since: preempted, or a batch grew them
                    graphs = None
                if graphs is None and eng.cuda_graphs:
                    from .runtime.graphs import DecodeGraph

                    graphs = DecodeGraph(eng, [self.state], self.state.position + self.max_tokens - n)
                return graphs.step([token]) if graphs is not None else eng.forward([token], self.state)

        # The prefill in segments that end at each checkpoint (the prefix cache keeps the state there)
        # and, batched, every PREFILL_SLICE tokens, each one a request the caller runs.
        ends = set(self.checkpoints) | (set(range(PREFILL_SLICE, len(self.ids), PREFILL_SLICE)) if self.batched else set())
        start = 0
        for end in sorted(e for e in ends if 0 < e < len(self.ids)) + [len(self.ids)]:
            if self.batched:
                request = ForwardRequest(self.ids[start:end], self.state, functools.partial(prefill, start, end), prefill=True)
                yield request
                logits = request.logits
                self.stats.prefill_seconds += request.seconds
            else:
                logits = prefill(start, end)
            if end in self.checkpoints:
                self.checkpoints[end]()
            start = end
        argmax = None  # the logits' argmax where a batched step read it
        try:
            for n in range(self.max_tokens):
                with self._measured(prefill=False, forward=False):
                    model_row = logits[-1]  # the model's own distribution: what logprobs report
                    row = model_row
                    if self.logits_processor is not None:
                        row = self.logits_processor(generated, row.cpu()).to(eng.device)
                    # the one host sync per token: reading the token (none where a batch read its argmax)
                    token = sampler(row, argmax if row is model_row else None)
                    generated.append(token)
                    if token in eng.stop_ids and not self.params.ignore_eos:
                        step = Step(token, text.flush(decoder.flush()), "stop")
                    else:
                        piece, stopped = text.push(decoder.push(token))
                        if stopped:
                            step = Step(token, piece, "stop")
                        elif n == self.max_tokens - 1:
                            step = Step(token, piece + text.flush(decoder.flush()), "length")
                        else:
                            step = Step(token, piece)
                    if self.params.logprobs is not None:
                        step.logprob, step.top_logprobs = token_logprobs(model_row, token, self.params.logprobs)
                yield step  # outside the measured block: the consumer's time is not ours
                if step.finish_reason:
                    return
                if self.batched:  # the caller runs the step, alone (timed in `decode`) or with others' (timed by it)
                    request = ForwardRequest([token], self.state, functools.partial(decode, token, n))
                    yield request
                    logits, argmax = request.logits, request.argmax
                    self.stats.decode_seconds += request.seconds
                else:
                    logits, argmax = decode(token, n), None
                self.stats.decode_tokens += 1
        finally:
            self.stats.peak_rss = peak_rss_bytes()

    @contextmanager
    def _measured(self, prefill: bool, forward: bool = True):
        """Add the enclosed work's wall time, timed sections and expert-store counters to this
        generation's statistics. Only the work itself is counted: a server interleaves several
        generations, and time spent suspended at a yield belongs to others. A `forward` block runs
        the model; the expert lookups that resident decode counts on the device are read at its
        end: after prefill at once (a read that waits for the GPU), after a decode step by a copy
        queued behind it, which the sampling block that always follows collects once reading the
        token has waited for the GPU anyway (and where the placement adapts, swaps experts by them
        before the next step). No yield comes between the two, so the counts stay this generation's."""
        eng, stats = self.engine, self.stats
        if self.batched and not forward:
            # A server's sampling block: the scheduler counts what its batches read (which their
            # sequences share), and copying the counters around each sequence's sampling was ~20%
            # of a 16-sequence round's host time (EXPERIMENTS 114). The lookups are still settled.
            try:
                yield
            finally:
                eng.settle("sampled")
            return
        t0, sections, (cache, gpu, ngrams) = time.perf_counter(), dict(eng.timer.seconds), eng.counters()
        try:
            yield
        finally:
            eng.settle("sampled" if not forward else "prefill" if prefill else "decode")
            cache_now, gpu_now, ngrams_now = eng.counters()
            seconds = time.perf_counter() - t0
            if prefill:
                stats.prefill_seconds += seconds
                stats.prefill_cache += cache_now - cache
                stats.prefill_ngrams += ngrams_now - ngrams
            else:
                stats.decode_seconds += seconds
                stats.cache += cache_now - cache
                stats.ngrams += ngrams_now - ngrams
                if gpu is not None:
                    stats.gpu_cache += gpu_now - gpu
                for name, total in eng.timer.seconds.items():
                    if total != sections.get(name, 0.0):
                        stats.decode_sections[name] = stats.decode_sections.get(name, 0.0) + total - sections.get(name, 0.0)


class _StopStrings:
    """Holds back streamed text that could still turn into a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self, tail: str = "") -> str:
        out, _ = self.push(tail)
        out, self.pending = out + self.pending, ""
        return out
