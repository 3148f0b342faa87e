"""/v1/messages in Anthropic's Messages shape, over raw HTTP."""

from __future__ import annotations

import json

import jsonschema

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"]}
TOOLS = [{"name": "count", "description": "Count things.", "input_schema": SCHEMA}]
HELLO = [{"role": "user", "content": "Count the stars."}]


def test_plain_message(http):
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 8, "temperature": 0, "system": "Be brief.", "messages": HELLO})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
    assert body["stop_reason"] in ("end_turn", "max_tokens") and body["usage"]["output_tokens"] >= 1
    assert [b["type"] for b in body["content"]] in (["text"], [])


def test_forced_tool_use_and_result_round_trip(http):
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 200, "temperature": 1, "messages": HELLO, "tools": TOOLS,
                                        "tool_choice": {"type": "tool", "name": "count"}})
    body = r.json()
    assert body["stop_reason"] == "tool_use", body
    (use,) = [b for b in body["content"] if b["type"] == "tool_use"]
    assert use["name"] == "count" and use["id"].startswith("toolu_")
    jsonschema.validate(use["input"], SCHEMA)

    turn = HELLO + [{"role": "assistant", "content": body["content"]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "42"},
                                                 {"type": "text", "text": "Thanks."}]}]
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 4, "messages": turn, "tools": TOOLS})
    assert r.status_code == 200 and r.json()["usage"]["cache_read_input_tokens"] > 0  # the earlier turn was reused


def test_streamed_events(http):
    body = {"model": "m", "max_tokens": 200, "temperature": 1, "stream": True, "messages": HELLO, "tools": TOOLS,
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    with http.stream("POST", "/v1/messages", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1:-2] == ["content_block_start", "content_block_delta", "content_block_stop"]
    assert data[1]["content_block"]["type"] == "tool_use" and data[1]["content_block"]["name"] == "count"
    jsonschema.validate(json.loads(data[2]["delta"]["partial_json"]), SCHEMA)
    assert data[-2]["delta"]["stop_reason"] == "tool_use"


def test_stop_sequence_is_reported(http):
    base = {"model": "m", "max_tokens": 40, "temperature": 0, "messages": HELLO}
    text = http.post("/v1/messages", json=base).json()["content"][0]["text"]
    # A printable ASCII character: the random model's text also holds U+FFFD for invalid bytes,
    # which can match the engine's pending, not yet decodable, bytes.
    stop = next(c for c in text[2:] if c.isascii() and c.isprintable())
    body = http.post("/v1/messages", json={**base, "stop_sequences": ["never-there", stop]}).json()
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == stop
    assert body["content"][0]["text"] == text[: text.index(stop)]
