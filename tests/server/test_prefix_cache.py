"""Prefix reuse: resumed generations compute what a fresh one does; the budget holds."""

from __future__ import annotations

import torch

from flashmoe.runtime.prefix_cache import PrefixCache, cached_generate, chat_checkpoints, state_bytes
from flashmoe.runtime.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]


def _run(engine, cache, ids, checkpoints=()):
    """(generated tokens, logits seen at each step, prompt tokens reused)."""
    seen = []

    def record(_, logits):
        seen.append(logits.clone())
        return logits

    gen, reused = cached_generate(engine, cache, ids, GREEDY, checkpoints, record)
    return [s.token for s in gen], seen, reused


def test_resumed_generation_matches_a_fresh_one(engine):
    tok = engine.tokenizer
    ids = tok.encode_chat(MESSAGES)
    points = chat_checkpoints(tok, MESSAGES, ids)
    assert len(points) == 2  # the end of the system turn, the end of the user turn
    fresh_tokens, fresh_logits, _ = _run(engine, None, ids)

    cache = PrefixCache(1 << 30)
    first_tokens, first_logits, reused = _run(engine, cache, ids, points)
    assert reused == 0 and cache.stats().entries == 2
    # Prefill split at the checkpoints: the same values up to rounding (the model's weights are
    # bf16, so one unit in the last place of a logit near 3 is 2**-6).
    torch.testing.assert_close(fresh_logits[0], first_logits[0], rtol=0, atol=2**-5)

    again_tokens, again_logits, reused = _run(engine, cache, ids, points)
    assert reused == points[-1] and again_tokens == first_tokens
    assert all(torch.equal(a, b) for a, b in zip(first_logits, again_logits, strict=True))  # the same splits: bit for bit

    next_turn = MESSAGES + [{"role": "assistant", "content": "Nile."}, {"role": "user", "content": "More?"}]
    next_ids = tok.encode_chat(next_turn)
    assert cache.lookup(next_ids)[0] == points[-1]  # the conversation so far is a prefix of the next prompt


def test_checkpoints_are_prompt_prefixes(engine):
    tok = engine.tokenizer
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    user_only = MESSAGES[1:]
    ids = tok.encode_chat(user_only, tools=tools)
    points = chat_checkpoints(tok, user_only, ids, tools)
    assert len(points) == 2  # the tools' system block, then the user turn
    head = tok.decode(ids[: points[0]])
    assert head.startswith("<|im_start|>system\n# Tools") and head.endswith("<|im_end|>\n")
    assert chat_checkpoints(tok, user_only, ids[: points[1]]) == []  # never the whole prompt


def test_budget_and_lookup_rules(engine):
    state = engine.new_state()
    for _ in engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=1), state=state):
        pass
    size = state_bytes(state.clone())  # clones keep only the used KV positions
    assert state_bytes(state) >= size >= state.nbytes
    cache = PrefixCache(2 * size)
    cache.store([1, 2], state.clone())
    cache.store([1, 2, 3], state.clone())
    assert cache.lookup([1, 2, 3])[0] == 2  # a generation needs at least one token left to feed
    assert cache.lookup([1, 2, 3, 9])[0] == 3
    assert cache.lookup([1, 5])[0] == 0 and cache.lookup([2, 1, 3])[0] == 0
    cache.store([7, 7], state.clone())  # over budget: the least recently used ([1, 2]) goes
    s = cache.stats()
    assert (s.entries, s.bytes) == (2, 2 * size) and cache.lookup([1, 2, 9])[0] == 0
    PrefixCache(size - 1).store([1], state)  # larger than the whole budget: not kept, no error
    reused, copy = cache.lookup([1, 2, 3, 4])
    assert reused == 3 and copy is not None and copy.position == state.position
