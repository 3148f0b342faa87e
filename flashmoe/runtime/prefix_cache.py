"""Prefix reuse: the decoding states (KV caches, linear-attention states) of token prefixes, kept
under a memory budget, so that a conversation's next turn, or any request that shares a system
prompt with an earlier one, prefills only the tokens after the longest prefix already seen.

A state exists only at the end of what was fed through the model, so prefixes are cached at
chosen checkpoints: the generation `cached_generate` returns prefills up to each checkpoint in its
own segment, keeps a copy of the state there, and goes on. Chat prompts use `chat_checkpoints`: the end of the system
block and the end of the conversation so far, which is where the next turn's prompt diverges.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from jinja2 import TemplateError

from .sampling import SamplingParams
from ..layers.state import SequenceState

if TYPE_CHECKING:
    from ..engine import Engine
    from ..generation import Generation, LogitsProcessor
    from ..tokenizer import Tokenizer


def state_bytes(state: SequenceState) -> int:
    """Memory the state holds: allocated storage, which for a KV cache grown by doubling can be up
    to twice the used bytes that `state.nbytes` counts."""
    return sum(
        value.untyped_storage().nbytes()
        for layer in [*state.layers, *state.ngrams.values()]
        for value in vars(layer).values()
        if isinstance(value, torch.Tensor)
    )


@dataclass(slots=True)
class PrefixCacheStats:
    entries: int
    bytes: int
    budget: int
    hits: int
    misses: int
    tokens_reused: int


class PrefixCache:
    """States keyed by the exact token ids that produced them; least recently used out first.

    Thread-safe: the generation thread fills it while a server thread may read its statistics."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[SequenceState, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._tokens_reused = 0
        self._lock = threading.Lock()

    def lookup(self, ids: Sequence[int]) -> tuple[int, SequenceState | None]:
        """(n, a private copy of the state after ids[:n]) for the longest cached n < len(ids); (0, None) if none.

        n stays below len(ids) because a generation needs at least one new token to prefill."""
        with self._lock:
            best: tuple[int, ...] | None = None
            for key in self._entries:
                n = len(key)
                if n < len(ids) and (best is None or n > len(best)) and ids[n - 1] == key[-1] and tuple(ids[:n]) == key:
                    best = key
            if best is None:
                self._misses += 1
                return 0, None
            self._entries.move_to_end(best)
            self._hits += 1
            self._tokens_reused += len(best)
            return len(best), self._entries[best][0].clone()

    def store(self, ids: Sequence[int], state: SequenceState) -> None:
        """Keeps `state` (the cache owns it from now on) as the state after `ids`, evicting the least
        recently used entries to stay within the budget; a state larger than the budget is not kept."""
        key, size = tuple(ids), state_bytes(state)
        if not key or size > self.budget:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            while self._entries and self._bytes + size > self.budget:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
            self._entries[key] = (state, size)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(len(self._entries), self._bytes, self.budget, self._hits, self._misses, self._tokens_reused)


def cached_generate(
    engine: Engine,
    cache: PrefixCache | None,
    ids: Sequence[int],
    params: SamplingParams,
    checkpoints: Iterable[int] = (),
    logits_processor: LogitsProcessor | None = None,
    batched: bool = False,
) -> tuple[Generation, int]:
    """The generation for prompt `ids`, resumed from the longest cached prefix, and how many prompt
    tokens that prefix covered. The states at `checkpoints` (token counts) are cached on the way.

    The generation's prefill stops at each checkpoint for the cache to keep a copy of the state.
    `batched`: as Engine.generate's."""
    reused, state = cache.lookup(ids) if cache is not None else (0, None)
    state = engine.pooled(state) if state is not None else engine.new_state()

    def keep(point: int) -> Callable[[], None]:
        return lambda: cache.store(ids[:point], state.clone())

    points = {p - reused: keep(p) for p in set(checkpoints) if cache is not None and reused < p < len(ids)}
    return engine.generate(list(ids[reused:]), params, state, logits_processor, batched, points), reused


def chat_checkpoints(tokenizer: Tokenizer, messages: list[dict[str, Any]], prompt_ids: Sequence[int],
                     tools: list[dict[str, Any]] | None = None, **template_vars: Any) -> list[int]:
    """Token counts of `prompt_ids` worth caching: the end of the system block (shared by every
    conversation with the same system prompt and tools) and the end of the conversation so far
    (the next turn's prompt starts with it). A candidate that does not tokenize as a prefix of the
    prompt, or that the template refuses to render on its own, is left out."""
    heads = [messages[:1]] if messages and messages[0].get("role") in ("system", "developer") else [[]] if tools else []
    out = []
    for head in heads + [messages]:
        try:
            ids = tokenizer.encode_chat(head, tools=tools, add_generation_prompt=False, **template_vars)
        except (ValueError, TemplateError):
            continue  # e.g. templates that insist on a user message
        n = len(ids)
        if 0 < n < len(prompt_ids) and list(prompt_ids[:n]) == ids:
            out.append(n)
    return sorted(set(out))
