"""Log-probabilities: of the model's own distribution, one entry per generated token, in OpenAI's
chat and legacy completions shapes, the same streamed or not."""

from __future__ import annotations

import pytest
import torch

from flashmoe.runtime.sampling import SamplingParams
from flashmoe.server.logprobs import TokenText
from flashmoe.tokenizer import Tokenizer

from .test_openai import ASK, TOOLS


def test_logprobs_are_of_the_distribution_before_any_mask(engine):
    seen = []

    def even_tokens_only(_, logits):  # as a grammar masks tokens
        seen.append(logits.clone())
        return torch.where(torch.arange(logits.numel()) % 2 == 0, logits, float("-inf"))

    params = SamplingParams(max_tokens=4, temperature=1, seed=0, logprobs=3)
    steps = list(engine.generate([1, 2, 3], params, logits_processor=even_tokens_only))
    for step, logits in zip(steps, seen, strict=True):
        expected = torch.log_softmax(logits, dim=-1)
        assert step.token % 2 == 0 and step.logprob == pytest.approx(float(expected[step.token]))
        values, ids = expected.topk(3)  # odd tokens among them: the mask is not applied
        assert [i for i, _ in step.top_logprobs] == ids.tolist()
        assert [lp for _, lp in step.top_logprobs] == pytest.approx(values.tolist())
    assert any(i % 2 for step in steps for i, _ in step.top_logprobs)  # the comparison could tell
    plain = next(iter(engine.generate([1, 2, 3], SamplingParams(max_tokens=1))))
    assert plain.logprob is None and plain.top_logprobs is None  # not asked for: not computed


def test_token_bytes_join_into_the_characters_they_split(tiny_model):
    tokenizer = Tokenizer.from_dir(tiny_model)  # byte-level: "é" is two tokens
    tokens = TokenText(tokenizer)
    ids = tokenizer.encode("é🙂!")
    assert [tokens.text(i) for i in ids[:2]] == ["\ufffd", "\ufffd"]  # half a character each
    assert bytes(b for i in ids for b in tokens.raw_bytes(i)).decode() == "é🙂!"
    assert tokens.raw_bytes(tokenizer.token_to_id("<|im_end|>")) == list(b"<|im_end|>")
    assert tokens.text(319) == "" and tokens.raw_bytes(319) is None  # past the tokenizer's vocabulary


def test_chat_logprobs_one_entry_per_token_streamed_or_not(client):
    kwargs = dict(model="m", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kwargs)
    entries = plain.choices[0].logprobs.content
    assert len(entries) == plain.usage.completion_tokens
    for entry in entries:
        best, second = entry.top_logprobs
        assert (entry.token, entry.logprob) == (best.token, best.logprob) and best.logprob >= second.logprob  # greedy
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    pieces = [e for chunk in streamed for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in entries]
    first_content = next(chunk for chunk in streamed if chunk.choices[0].delta.content)
    assert first_content.choices[0].logprobs.content  # a chunk carries the tokens its text came from


def test_chat_logprobs_cover_tool_call_markup(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=300, temperature=1, seed=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, logprobs=True)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens and entries[0].top_logprobs == []
    assert "<function=get_weather>" in "".join(e.token for e in entries)


def test_completions_logprobs_in_the_legacy_shape(client):
    kwargs = dict(model="m", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    plain = client.completions.create(**kwargs)
    lp, text = plain.choices[0].logprobs, plain.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == plain.usage.completion_tokens
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob == max(top.values()) and len(top) <= 3  # the 2 likeliest, and the chosen one
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == lp.text_offset


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": ASK, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": ASK, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1, "echo": True}, "logprobs"),
])
def test_logprob_requests_out_of_range(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
