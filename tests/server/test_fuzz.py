"""Property-based fuzzing of the three POST routes: whatever the body, the answer is a valid 200
or a clear 4xx in the route's error shape (never a 500, never a hang), and the server stays
healthy after all of them.

Each body starts valid-ish (asking for 1-2 tokens, so generating is cheap) and takes at most one
hostile change, somewhere in it: a value of any JSON type, a number out of range, nesting deep or
past the limit, odd Unicode (lone surrogates, control characters, markup, raw or escaped), or a
string up to the body limit. Hypothesis runs derandomized: a run of tests/server sends the same
bodies every time for the same source tree (Hypothesis also draws constants from the project's
loaded modules, so a change to them, or running this module alone, brings other bodies).
The tally of what was tried prints when the module ends (`pytest -rP` shows it)."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmoe.server.http import MAX_JSON_DEPTH

from ..hostile_json import JSON_VALUES
from .conftest import API_KEY

BODY_LIMIT = 1 << 20  # the test server's --max-body
HANG = 30  # seconds: no request here should take a tenth of it


@dataclass(frozen=True)
class Raw:
    """JSON text to put in a body as it is: json.dumps cannot write what it holds."""

    text: str


# -- valid-ish parts ------------------------------------------------------------------------------
MARKUP = ["<|im_end|>", "<|im_start|>system\n", "<tool_call>", "</tool_call>", "<think>", "</think>",
          "<function=get_time>", "{{ raise_exception('x') }}", "{% for x in range(9**9) %}", "\u202e", "\ufeff", "\x00"]
TEXT = st.one_of(st.text(max_size=20), st.sampled_from(MARKUP))
FEW_TOKENS = st.integers(1, 2)
TOOL = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 4}}}}}

CHAT = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                                                 "content": TEXT}), min_size=1, max_size=3),
     "max_tokens": FEW_TOKENS},
    optional={"tools": st.just([TOOL]),
              "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "get_time"}}]),
              "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                                  {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}]),
              "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
              "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(-(2**63), 2**63 - 1), "stop": st.lists(TEXT, max_size=3),
              "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20), "stream": st.booleans(),
              "chat_template_kwargs": st.fixed_dictionaries({"enable_thinking": st.booleans()})},
)
COMPLETION = st.fixed_dictionaries(
    {"prompt": st.one_of(TEXT.filter(bool), st.lists(st.integers(0, 319), min_size=1, max_size=8)), "max_tokens": FEW_TOKENS},
    optional={"temperature": st.floats(0, 2), "echo": st.booleans(), "logprobs": st.integers(0, 5), "stop": TEXT,
              "seed": st.integers(0, 2**63 - 1), "stream": st.booleans()},
)
MESSAGES = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                                     {"type": st.just("text"), "text": TEXT}), max_size=2))}),
                          min_size=1, max_size=3),
     "max_tokens": FEW_TOKENS},
    optional={"system": TEXT, "tools": st.just([{"name": "get_time", "input_schema": TOOL["function"]["parameters"]}]),
              "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "get_time"}]),
              "thinking": st.sampled_from([{"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}]),
              "stop_sequences": st.lists(TEXT, max_size=3), "temperature": st.floats(0, 1), "top_k": st.integers(0, 50),
              "stream": st.booleans()},
)

# Where a hostile value may go, per route: fields, and places inside messages and tools.
PATHS = {
    "/v1/chat/completions": [("messages",), ("messages", 0), ("messages", 0, "content"), ("messages", 0, "role"),
                             ("messages", 0, "tool_calls"), ("tools",), ("tools", 0, "function", "name"),
                             ("tools", 0, "function", "parameters"), ("tool_choice",), ("response_format",), ("temperature",),
                             ("top_p",), ("top_k",), ("max_tokens",), ("max_completion_tokens",), ("seed",), ("stop",),
                             ("logprobs",), ("top_logprobs",), ("n",), ("stream",), ("stream_options",), ("chat_template_kwargs",),
                             ("repetition_penalty",)],
    "/v1/completions": [("prompt",), ("prompt", 0), ("max_tokens",), ("temperature",), ("echo",), ("logprobs",), ("stop",),
                        ("seed",), ("top_k",), ("stream",)],
    "/v1/messages": [("messages",), ("messages", 0, "content"), ("messages", 0, "content", 0), ("messages", 0, "role"),
                     ("system",), ("max_tokens",), ("tools",), ("tools", 0, "name"), ("tools", 0, "input_schema"),
                     ("tool_choice",), ("thinking",), ("stop_sequences",), ("temperature",), ("top_k",), ("stream",)],
}

# -- hostile values -------------------------------------------------------------------------------
NUMBERS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 2**70, -(2**70), 10**40, 1e308, -1e308, 5e-324, 1e-300, -0.0, -1, 0,
                           Raw("1e999"), Raw("NaN"), Raw("-Infinity"), Raw("1" + "0" * 5000)])
DEEP = st.tuples(st.one_of(st.integers(MAX_JSON_DEPTH - 8, MAX_JSON_DEPTH + 2), st.sampled_from([1000, 100_000])),
                 st.sampled_from(["[", '{"a": '])).map(lambda d: Raw(d[1] * d[0] + "1" + ("]" if d[1] == "[" else "}") * d[0]))
ODD_TEXT = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(MARKUP)), min_size=1,
                    max_size=8).map("".join)
HUGE_TEXT = st.sampled_from([10_000, 500_000, BODY_LIMIT]).map(lambda n: "x" * n)
HOSTILE = {"any JSON value": JSON_VALUES, "number out of range": NUMBERS, "deep nesting": DEEP, "odd Unicode": ODD_TEXT,
           "huge string": HUGE_TEXT}


def _put(body: dict, path: tuple, value: Any) -> None:
    """body[path[0]][path[1]]... = value, making the containers on the way where they are missing
    (a list where the next key is the index 0, the only index used)."""
    node: Any = body
    for key, inner in zip(path, path[1:]):
        child = node.get(key) if isinstance(node, dict) else (node[0] if node else None)
        if not isinstance(child, list if inner == 0 else dict):
            child = [] if inner == 0 else {}
            _set(node, key, child)
        node = child
    _set(node, path[-1], value)


def _set(node: dict | list, key: str | int, value: Any) -> None:
    if isinstance(node, list) and not node:
        node.append(value)
    else:
        node[key] = value


def _keep_cheap(body: dict) -> None:
    """A hostile value may happen to be a valid token count: never more than 2 here (a missing or
    null one means "up to the context's end")."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key, 0)
        if value is None or (type(value) is int and 2 < value < 2**31):
            body[key] = 2


def _encode(body: dict, raw_unicode: bool) -> bytes:
    """JSON text; escaped (non-ASCII as \\u and four hex digits, lone surrogates as such) or raw
    UTF-8 (surrogates then as the invalid bytes they encode to); Raw values put in as they are."""
    raws: list[str] = []

    def stash(value: Raw) -> str:
        raws.append(value.text)
        return f"@raw{len(raws) - 1}@"

    text = json.dumps(body, default=stash, ensure_ascii=not raw_unicode)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"', raw)
    return text.encode("utf-8", errors="surrogatepass")


ROUTES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/messages": MESSAGES}


# -- checks ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_before(server) -> int:
    return server.health()["queue"]["failed"]


@pytest.fixture(scope="module")
def tally(failed_before):
    """(category, outcome) -> count over the module; printed at its end."""
    counts: collections.Counter = collections.Counter()
    yield counts
    print("\nfuzzed requests: category | tried | valid 200 | clear 4xx | 500 | hang | broken answer")
    for category in ["valid-ish", *HOSTILE, "all"]:
        row = [sum(n for (c, out), n in counts.items() if out == outcome and category in (c, "all"))
               for outcome in ("200", "4xx", "500", "hang", "broken")]
        print(" | ".join(map(str, [category, sum(row), *row])))


@pytest.fixture(scope="module")
def fuzz_client(server):
    with httpx.Client(base_url=server.url, timeout=HANG, headers={"Authorization": f"Bearer {API_KEY}",
                                                                   "Content-Type": "application/json"}) as client:
        yield client


def _outcome(route: str, r: httpx.Response) -> str:
    if r.status_code >= 500:
        return "500"
    if 400 <= r.status_code < 500:
        return "4xx" if _is_error_shape(route, r) else "broken"
    return "200" if r.status_code == 200 and _is_answer(route, r) else "broken"


def _is_error_shape(route: str, r: httpx.Response) -> bool:
    if not r.headers.get("content-type", "").startswith("application/json"):
        return False
    body = r.json()
    error = body.get("error", {})
    if route == "/v1/messages":
        return body.get("type") == "error" and isinstance(error.get("type"), str) and bool(error.get("message"))
    return isinstance(error.get("type"), str) and bool(error.get("message")) and {"param", "code"} <= error.keys()


def _is_answer(route: str, r: httpx.Response) -> bool:
    if r.headers["content-type"].startswith("text/event-stream"):  # streamed: complete, and no error event
        lines = r.text.splitlines()
        last = 'data: {"type": "message_stop"}' if route == "/v1/messages" else "data: [DONE]"
        return lines[-2 if lines[-1] == "" else -1] == last and not any(
            line == "event: error" or line.startswith('data: {"error"') for line in lines)
    body = r.json()
    if route == "/v1/messages":
        return body["type"] == "message" and body["usage"]["output_tokens"] <= 2
    return body["object"] in ("chat.completion", "text_completion") and body["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("category", ["valid-ish", *HOSTILE])
@pytest.mark.parametrize("route", ROUTES)
# A few seconds in all; derandomized (and no example database), so every run sends the same bodies.
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_requests_get_an_answer_or_a_clear_error(fuzz_client, tally, route, category, data):
    body = data.draw(ROUTES[route], "valid-ish body")
    if category != "valid-ish":
        _put(body, data.draw(st.sampled_from(PATHS[route]), "where"), data.draw(HOSTILE[category], category))
        _keep_cheap(body)
    content = _encode(body, raw_unicode=data.draw(st.booleans(), "raw UTF-8"))
    try:
        outcome = _outcome(route, fuzz_client.post(route, content=content))
    except httpx.TimeoutException:
        outcome = "hang"
    tally[category, outcome] += 1
    assert outcome in ("200", "4xx")


def test_the_server_is_healthy_after_the_fuzzing(http, failed_before):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["queue"]["failed"] == failed_before  # no generation broke
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
