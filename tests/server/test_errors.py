"""Each bad input over raw HTTP: the status code and OpenAI's (or Anthropic's) error JSON shape."""

from __future__ import annotations

import httpx
import pytest

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
