"""The OpenAI-compatible routes, driven by the official `openai` client against a real server."""

from __future__ import annotations

import json

import jsonschema

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city.", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}}}},
]
ASK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the weather in Oslo?"}]


def test_models_and_health(client, server):
    (model,) = client.models.list().data
    assert model.id == "model" and model.owned_by == "flashmoe"
    health = server.health()
    assert health["status"] == "ok" and health["context_length"] == 4096
    assert {"active", "waiting", "completed"} <= health["queue"].keys() and "hit_rate" in health["expert_cache"]


def test_plain_and_streamed_agree(client):
    kwargs = dict(model="m", messages=ASK, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert 1 <= plain.usage.completion_tokens <= 12

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same tokens, streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_prefix_reuse_across_turns(client):
    first = client.chat.completions.create(model="m", messages=ASK, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model="m", messages=ASK, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    follow_up = ASK + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And tomorrow?"}]
    second = client.chat.completions.create(model="m", messages=follow_up, max_tokens=6, temperature=0)
    # everything up to the end of the first user turn came from the cache
    assert second.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens_details.cached_tokens


def _check_call(call, name="get_weather"):
    assert call.type == "function" and call.function.name == name and call.id
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER_PARAMS if name == "get_weather" else TOOLS[1]["function"]["parameters"])
    return args


def test_forced_tool_call(client):
    for seed in range(3):  # sampled, so each seed gives different (random-model) arguments
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=300, temperature=1, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])


def test_required_tool_calls_streamed(client):
    stream = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=300, temperature=1, seed=1, stream=True)
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # no markup leaks as content
    _check_call(deltas[0], deltas[0].function.name)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_go_back_to_the_model(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 0


def test_json_schema_and_json_object(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
    for seed in range(3):
        r = client.chat.completions.create(
            model="m", messages=ASK, max_tokens=400, temperature=1, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=400, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_stop_sequence(client):
    text = client.completions.create(model="m", prompt="Once upon a time", max_tokens=24, temperature=0).choices[0].text
    stop = next(c for c in text[2:] if c.isascii() and c.isprintable())  # not U+FFFD: see test_anthropic
    cut = client.completions.create(model="m", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]


def test_ignore_eos_runs_to_max_tokens(client):
    # "Say 10" is a prompt whose greedy answer from this tiny model ends with its end-of-sequence token
    ask = dict(model="m", messages=[{"role": "user", "content": "Say 10"}], max_tokens=64, temperature=0)
    ended = client.chat.completions.create(**ask)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 64
    full = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 64


def test_completions_plain_and_streamed(client):
    plain = client.completions.create(model="m", prompt="Hello", max_tokens=8, temperature=0)
    assert plain.object == "text_completion" and plain.usage.prompt_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="Hello", max_tokens=8,
                                                                           temperature=0, stream=True))
    assert streamed == plain.choices[0].text
    echoed = client.completions.create(model="m", prompt="Hello", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello" + plain.choices[0].text
