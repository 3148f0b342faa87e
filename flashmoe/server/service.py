"""The model behind the HTTP routes: prompt building, sampling settings, grammars, prefix reuse
and the generation queue. Routes translate their API's shapes to and from these calls."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from jinja2 import TemplateError

from ..engine import Engine
from ..generation import ContextLengthError, Step
from ..runtime.prefix_cache import PrefixCache, cached_generate, chat_checkpoints
from ..runtime.sampling import SamplingParams
from ..tool_calls import Content, Event, OutputParser
from .errors import APIError
from .grammar import GrammarError, GrammarProcessor, Grammars
from .logprobs import TokenText
from .scheduler import Done, Failed, Job, QueueFullError, Scheduler


_TEMPLATE_ARGS = {"messages", "tools", "add_generation_prompt"}


@dataclass(slots=True)
class Plan:
    """Everything one generation needs, decided before it is queued."""

    ids: list[int]
    params: SamplingParams
    checkpoints: list[int] = field(default_factory=list)
    grammar: str | None = None
    tools: list[dict[str, Any]] | None = None  # offered to the model: its tool calls are parsed
    reasoning: bool = False  # the prompt opened a <think> block

    def parser(self) -> OutputParser:
        return OutputParser(self.tools, self.reasoning, parse_tool_calls=bool(self.tools))


@dataclass(slots=True)
class Started:
    """First event of a job: how many prompt tokens came from the prefix cache."""

    prompt_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" or "length"
    stop_sequence: str | None = None  # the stop string that ended the output, if one did

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class _Stopped:
    stop_sequence: str | None


class ModelService:
    """One loaded model serving requests: plans them, queues them, and reports on them."""

    def __init__(self, engine: Engine, name: str, sampling_defaults: dict[str, float],
                 prefix_cache_bytes: int, parallel: int, max_queue: int, state_mem: int | None = None) -> None:
        self.engine, self.tokenizer, self.name = engine, engine.tokenizer, name
        self.defaults = sampling_defaults
        self.created = int(time.time())
        self.grammars = Grammars.for_engine(engine)
        self.token_text = TokenText(engine.tokenizer)
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.scheduler = Scheduler(parallel, max_queue, engine, state_mem)

    # -- planning (in a worker thread, as tokenizing is slow; APIError for the client's mistakes) --
    def chat_plan(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, params: dict[str, Any],
                  grammar: str | None = None, template_vars: dict[str, Any] | None = None) -> Plan:
        # Extra template variables come from the client: they may not replace the ones set here.
        template_vars = {k: v for k, v in (template_vars or {}).items() if k not in _TEMPLATE_ARGS}
        reasoning = bool(template_vars.pop("enable_thinking", False))
        try:
            ids = self.tokenizer.encode_chat(messages, tools=tools, enable_thinking=reasoning, **template_vars)
        except (ValueError, TypeError, TemplateError) as e:
            raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from e
        self._check_context(len(ids), "messages")
        checkpoints = []
        if self.cache is not None:
            checkpoints = chat_checkpoints(self.tokenizer, messages, ids, tools, enable_thinking=reasoning, **template_vars)
        return Plan(ids, self.sampling(len(ids), **params), checkpoints, grammar, tools, reasoning)

    def text_plan(self, prompt: str | list[int], params: dict[str, Any]) -> Plan:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if max(ids) >= self.engine.args.vocab_size or min(ids) < 0:
            raise APIError(400, f"token ids must be in [0, {self.engine.args.vocab_size})", param="prompt")
        self._check_context(len(ids), "prompt")
        return Plan(ids, self.sampling(len(ids), **params))

    def sampling(self, prompt_tokens: int, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                 stop: str | list[str] | None = None, seed: int | None = None,
                 logprobs: int | None = None, ignore_eos: bool = False) -> SamplingParams:
        """Request settings over the model's defaults; max_tokens is capped by the context left.
        `logprobs`: report each token's and its N likeliest alternatives' (None: off). `ignore_eos`:
        generate max_tokens whatever the model says (stop strings still end it)."""
        room = self.engine.context_length - prompt_tokens
        d = self.defaults
        try:
            return SamplingParams(
                max_tokens=min(max_tokens or room, room),
                temperature=d["temperature"] if temperature is None else temperature,
                top_p=d["top_p"] if top_p is None else top_p,
                top_k=int(d["top_k"] if top_k is None else top_k),
                repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                seed=seed,
                stop=[stop] if isinstance(stop, str) else list(stop or []),
                logprobs=logprobs,
                ignore_eos=ignore_eos,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def _check_context(self, prompt_tokens: int, param: str) -> None:
        limit = self.engine.context_length
        if prompt_tokens >= limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_tokens} "
                f"tokens (at least one more is needed to generate). Shorten the {param}.",
                param=param, code="context_length_exceeded",
            )

    # -- running ---------------------------------------------------------------------------------
    async def submit(self, plan: Plan) -> Job:
        """Queues the plan's generation; 400 for a grammar that does not compile, 503 when full."""
        processor = None
        if plan.grammar is not None:
            try:  # compiling a large schema can take a while: keep the event loop free
                processor = await asyncio.to_thread(self.grammars.processor, plan.grammar)
            except GrammarError as e:
                raise APIError(400, f"invalid JSON schema or tools: {e}") from e
        try:
            return self.scheduler.submit(self._work(plan, processor), asyncio.get_running_loop())
        except QueueFullError:
            s = self.scheduler.stats()
            raise APIError(503, f"the server is busy ({s.active} generating, {s.waiting} queued); retry shortly",
                           headers={"Retry-After": "1"}) from None

    def _work(self, plan: Plan, processor: GrammarProcessor | None) -> Iterator[Any]:
        """Runs on the generation thread, one step per next(); closing it drops the state."""
        gen, reused = cached_generate(self.engine, self.cache, plan.ids, plan.params, plan.checkpoints, processor,
                                      batched=True)
        yield Started(len(plan.ids), reused)
        tokens, text, last = [], [], None
        for item in gen:
            if not isinstance(item, Step):  # a ForwardRequest: the scheduler runs it with the other jobs'
                yield item
                continue
            last = item
            tokens.append(last.token)
            text.append(last.text)
            yield last
        if last is not None and last.finish_reason == "stop" and last.token not in self.engine.stop_ids:
            yield _Stopped(_matched_stop(self.tokenizer.decode(tokens), "".join(text), plan.params.stop))

    async def events(self, job: Job, parser: OutputParser | None) -> AsyncIterator[Event | Step | Usage]:
        """The job's output as parsed events, then its Usage; generation errors become APIError.
        With logprobs asked for, each Step comes too, before the events its text became."""
        usage = Usage()
        while True:
            item = await job.events.get()
            if isinstance(item, Done):
                break
            if isinstance(item, Failed):
                if isinstance(item.error, ContextLengthError):
                    raise APIError(400, str(item.error), code="context_length_exceeded")
                raise APIError(500, f"generation failed: {item.error}")
            if isinstance(item, Started):
                usage.prompt_tokens, usage.cached_tokens = item.prompt_tokens, item.cached_tokens
            elif isinstance(item, _Stopped):
                usage.stop_sequence = item.stop_sequence
            elif isinstance(item, Step):
                usage.completion_tokens += 1
                usage.finish_reason = item.finish_reason or usage.finish_reason
                if item.logprob is not None:
                    yield item
                for event in parser.push(item.text) if parser else [Content(item.text)]:
                    yield event
        for event in parser.finish() if parser else []:
            yield event
        yield usage

    def health(self) -> dict[str, Any]:
        store, gpu, _ = self.engine.counters()
        return {
            "status": "ok",
            "model": self.name,
            "context_length": self.engine.context_length,
            "queue": vars_of(self.scheduler.stats()),
            "decode": vars_of(self.scheduler.decode_stats()),
            "expert_cache": {"hits": store.hits, "misses": store.misses, "hit_rate": round(store.hit_rate, 4),
                             "bytes_read": store.bytes_read, "evictions": store.evictions},
            "gpu_expert_cache": None if gpu is None else {
                "hits": gpu.hits, "misses": gpu.misses, "hit_rate": round(gpu.hit_rate, 4),
                "bytes_copied": gpu.bytes_copied},
            "prefix_cache": vars_of(self.cache.stats()) if self.cache is not None else None,
        }

    def close(self) -> None:
        self.scheduler.close()
        if self.cache is not None:
            self.cache.clear()
        self.engine.close()  # after the scheduler's thread: saves what adaptive placement learned


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def _matched_stop(full: str, emitted: str, stops: list[str]) -> str | None:
    # The engine emits everything before the stop string and drops the rest, so the stop string
    # that ended the output starts right where the emitted text ends.
    return next((s for s in stops if s and full.startswith(s, len(emitted))), None)
