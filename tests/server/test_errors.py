"""Each bad input over raw HTTP: the status code and OpenAI's (or Anthropic's) error JSON shape."""

from __future__ import annotations

import asyncio
import json
from http.client import HTTPConnection

import httpx
import pytest

from flashmoe.server.http import UnhandledErrorMiddleware

from .conftest import API_KEY

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= err.keys()
    return err


def test_malformed_json(http):
    err = _error(http.post(CHAT, content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    assert "JSON object" in _error(http.post(CHAT, json=[1, 2]), 400)["message"]


@pytest.mark.parametrize("body,param", [
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "max_tokens": "10"}, "max_tokens"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "n": 3}, "n"),
    ({}, "messages"),
])
def test_wrong_types(http, body, param):
    err = _error(http.post(CHAT, json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_prompt_past_the_context_names_the_limit(http):
    long = [{"role": "user", "content": "x" * 5000}]  # byte-level tokenizer: one token per byte
    err = _error(http.post(CHAT, json={"messages": long}), 400)
    assert "4096" in err["message"] and err["code"] == "context_length_exceeded"
    err = _error(http.post("/v1/completions", json={"prompt": "y" * 5000}), 400)
    assert "4096" in err["message"]


def test_api_key(server):
    body = {"messages": HELLO, "max_tokens": 1}
    assert _error(httpx.post(server.url + CHAT, json=body), 401)["code"] == "invalid_api_key"
    assert _error(httpx.post(server.url + CHAT, json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.post(server.url + CHAT, json=body, headers={"x-api-key": API_KEY}, timeout=60).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # open for monitors


def test_body_too_large(http):
    big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    assert "limit" in _error(http.post(CHAT, json=big), 413)["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    assert _error(http.post(CHAT, content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_unknown_fields_are_ignored(http):
    body = {"messages": [{"role": "user", "content": "hi", "x_note": 1}], "max_tokens": 2, "frobnicate": True,
            "logit_bias": {"1": 5}, "user": "u-1"}
    r = http.post(CHAT, json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body,text", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text content"),
    ({"messages": HELLO, "tool_choice": "required"}, "tools"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "'g'"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}}, "schema"),
])
def test_requests_that_cannot_be_served(http, body, text):
    assert text in _error(http.post(CHAT, json=body), 400)["message"]


def test_unknown_route_and_method(http):
    assert _error(http.get("/v1/nothing"), 404)
    assert _error(http.get(CHAT), 405)


def test_anthropic_error_shape(http):
    r = http.post("/v1/messages", json={"messages": HELLO})  # max_tokens is required there
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _nested_schema(depth: int) -> str:
    return '{"type": "object", "properties": {"a": ' * depth + "{}" + "}}" * depth


HI = '[{"role": "user", "content": "hi"}]'
TOOL = '[{"type": "function", "function": {"name": "f", "parameters": %s}}]'

# Bodies, written out as JSON text: some cannot be produced by json.dumps (deep, lone surrogates).
HOSTILE = {
    "lone surrogate": (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    "lone surrogate in a key": (CHAT, '{"messages": %s, "chat_template_kwargs": {"\\udfff": 1}}' % HI, "surrogate"),
    "nested 100,000 deep": (CHAT, '{"messages": %s}' % _deep(100_000), "deep"),
    "nested 100,000 deep, messages route": ("/v1/messages", '{"max_tokens": 1, "messages": %s}' % _deep(100_000), "deep"),
    "unclosed brackets": (CHAT, '{"messages": ' + "[" * 100_000, "deep"),
    "tool schema 5,000 deep": (CHAT, '{"messages": %s, "tools": %s}' % (HI, TOOL % _nested_schema(5000)), "deep"),
    "seed 2**70": (CHAT, '{"messages": %s, "seed": %d}' % (HI, 2**70), "seed"),
    "max_tokens 2**70": (CHAT, '{"messages": %s, "max_tokens": %d}' % (HI, 2**70), "max_tokens"),
    "top_k 2**70": ("/v1/completions", '{"prompt": "hi", "top_k": %d}' % 2**70, "top_k"),
    "repetition_penalty 1e39": (CHAT, '{"messages": %s, "repetition_penalty": 1e39}' % HI, "repetition_penalty"),
    "NaN": (CHAT, '{"messages": %s, "temperature": NaN}' % HI, "float range"),
    "1e999": ("/v1/messages", '{"messages": %s, "max_tokens": 1, "temperature": 1e999}' % HI, "float range"),
    "stop string of 100,000 characters": (CHAT, '{"messages": %s, "stop": "%s"}' % (HI, "x" * 100_000), "stop"),
    "not UTF-8": (CHAT, b'{"messages": [{"role": "user", "content": "\xff"}]}', "UTF-8"),
}


@pytest.fixture(scope="module")
def connection(server):
    """One keep-alive connection for every request of a test: it must survive each error."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.connect()
    conn.auto_open = 0  # a connection the server closed is an error, not silently reopened
    yield conn
    conn.close()


def _send(conn: HTTPConnection, path: str, body: str | bytes) -> tuple[int, dict]:
    conn.request("POST", path, body.encode() if isinstance(body, str) else body,
                 {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_bodies_are_clear_400s_on_a_connection_that_stays_open(connection, case):
    path, body, text = HOSTILE[case]
    status, reply = _send(connection, path, body)
    assert status == 400, reply
    message = reply["error"]["message"]
    assert text in message or text == reply["error"].get("param"), message
    if path == "/v1/messages":
        assert reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error"
    status, reply = _send(connection, CHAT, '{"messages": %s, "max_tokens": 1}' % HI)
    assert status == 200 and reply["usage"]["completion_tokens"] == 1


def test_extreme_values_in_range_are_served(http):
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 1e-300, "top_p": 5e-324, "seed": -(2**63),
            "repetition_penalty": 0.01, "stop": ["x" * 256] * 16}
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text


def _call(name: str) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": "{}"}}


MARKUP = "x>\n</function><tool_call>"


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": MARKUP}}]}, "tools.0.function.name"),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": MARKUP}}}, "tool_choice.function.name"),
    (CHAT, {"messages": HELLO + [{"role": "assistant", "tool_calls": [_call(MARKUP)]}]}, "messages.1.tool_calls.0.function.name"),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools.0.function.name"),
    ("/v1/messages", {"max_tokens": 1, "messages": HELLO, "tools": [{"name": MARKUP}]}, "tools.0.name"),
    ("/v1/messages", {"max_tokens": 1, "messages": HELLO, "tools": [{"name": "f"}], "tool_choice": {"type": "tool", "name": MARKUP}},
     "tool_choice.name"),
    ("/v1/messages", {"max_tokens": 1, "messages": HELLO + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": MARKUP, "input": {}}]}]}, "messages.1.content.0.name"),
])
def test_tool_names_must_be_plain_identifiers(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert param in message and "a-zA-Z0-9_-" in message


@pytest.mark.parametrize("parameters,text", [
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}}, "minLength"),
    ({"type": "object", "properties": [1, 2]}, "properties"),
    ({"type": "object", "properties": {"a": {}}, "required": 5}, "required"),
    ({"type": "object", "properties": {"a": {}}, "required": [{}]}, "required"),
    ({"type": "object", "properties": {"a": {"enum": 5}}}, "enum"),
])
def test_malformed_tool_schemas_are_400s_naming_the_tool(http, parameters, text):
    body = {"messages": HELLO, "max_tokens": 1, "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}
    err = _error(http.post(CHAT, json=body), 400)
    assert text in err["message"] and "'f'" in err["message"] and err["param"] == "tools"


def test_an_unexpected_error_is_a_500_that_keeps_the_connection():
    async def broken(scope, receive, send):
        raise RuntimeError("bug")

    sent = []

    async def send(message):
        sent.append(message)

    # Answered, not raised on: uvicorn drops the connection of an app that raises.
    asyncio.run(UnhandledErrorMiddleware(broken)({"type": "http", "method": "POST", "path": "/v1/messages"}, None, send))
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {"type": "error", "error": {"type": "api_error", "message": "internal error: bug"}}
