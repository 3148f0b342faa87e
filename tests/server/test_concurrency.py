"""Many clients at once: nobody sees another's tokens, disconnects cancel, rude clients get their
errors without disturbing anyone, a full queue says 503."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import API_KEY, Server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
SYSTEM = {"role": "system", "content": "Answer briefly."}
PROMPTS = [[SYSTEM, {"role": "user", "content": f"Client {i}: describe topic number {i}."}] for i in range(4)]
# A grammar that forbids ending before 3000 characters: a request that is surely still running.
LONG = {"max_tokens": 3000, "response_format": {"type": "json_schema", "json_schema": {
    "name": "long", "schema": {"type": "string", "minLength": 3000}}}}


def _stream(url: str, body: dict, disconnect_after: int | None = None) -> dict | None:
    """A streamed chat completion read as raw SSE; None if this client hung up on purpose."""
    out = {"ids": set(), "text": "", "finish": None, "done": False}
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                                                  headers=AUTH) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not out["done"], line
            if line == "data: [DONE]":
                out["done"] = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            out["ids"].add(chunk["id"])
            (choice,) = chunk["choices"]
            out["text"] += choice["delta"].get("content") or ""
            out["finish"] = choice["finish_reason"] or out["finish"]
            events += 1
            if disconnect_after is not None and events >= disconnect_after:
                return None  # leaving the with-blocks closes the connection mid-stream
    return out


# Bodies of clients that misbehave, and what each gets back: a 400, or (announcing more body than
# it sends, then hanging up) nothing.
RUDE = [
    (b'{"messages": ' + b"[" * 100_000, "HTTP/1.1 400 Bad Request"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "HTTP/1.1 400 Bad Request"),
    (b"\xff\xfe not even UTF-8", "HTTP/1.1 400 Bad Request"),
    (b'{"messages": [', ""),
]


def _rude(port: int, kind: int) -> str:
    """Sends the RUDE body `kind` over a raw connection: the status line it got back."""
    body, _ = RUDE[kind]
    hangs_up = kind == len(RUDE) - 1
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 1000 * hangs_up}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        return "" if hangs_up else s.recv(65536).split(b"\r\n", 1)[0].decode()


def _wait_idle(server: Server) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        queue = server.health()["queue"]
        if queue["active"] == 0 and queue["waiting"] == 0:
            return queue
        time.sleep(0.1)
    raise AssertionError(f"the server is still busy: {queue}")


def test_sixteen_clients_some_disconnecting_among_rude_ones(server, http):
    greedy = {"max_tokens": 24, "temperature": 0}
    # One at a time first: each prompt's answer (greedy, so each concurrent client must get exactly it).
    expected = [http.post("/v1/chat/completions", json={"messages": p, **greedy}).json()["choices"][0]["message"]["content"]
                for p in PROMPTS]
    before = _wait_idle(server)

    def client(i: int) -> dict | None:
        if i % 4 == 3:
            return _stream(server.url, {"messages": PROMPTS[i % 4], **LONG}, disconnect_after=3)
        return _stream(server.url, {"messages": PROMPTS[i % 4], **greedy})

    with ThreadPoolExecutor(16 + len(RUDE)) as pool:
        rude = [pool.submit(_rude, server.port, kind) for kind in range(len(RUDE))]
        results = list(pool.map(client, range(16)))
    assert [f.result() for f in rude] == [status for _, status in RUDE]

    completed = [(i, r) for i, r in enumerate(results) if r is not None]
    assert len(completed) == 12
    ids = [next(iter(r["ids"])) for _, r in completed]
    assert all(len(r["ids"]) == 1 for _, r in completed) and len(set(ids)) == 12
    for i, r in completed:
        assert r["done"] and r["finish"] in ("stop", "length")
        assert r["text"] == expected[i % 4], f"client {i} got another answer"
    after = _wait_idle(server)
    assert after["cancelled"] - before["cancelled"] == 4 and after["failed"] == before["failed"]
    assert after["largest_batch"] > 1  # concurrent requests' decode steps ran together
    assert http.post("/v1/chat/completions", json={"messages": PROMPTS[0], **greedy}).json()["choices"][0]["message"][
        "content"] == expected[0]


def test_disconnect_while_waiting_for_a_plain_response(server):
    before = _wait_idle(server)["cancelled"]
    body = json.dumps({"messages": PROMPTS[1], **LONG}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + body)
        time.sleep(0.5)  # generating now; hang up without reading
    assert _wait_idle(server)["cancelled"] == before + 1


@pytest.fixture(scope="module")
def small_server(tiny_model):
    s = Server(tiny_model, "--parallel", "1", "--max-queue", "1")
    yield s
    s.stop()


def test_full_queue_is_503(small_server):
    body = {"messages": PROMPTS[0], "stream": True, **LONG}
    with httpx.Client(timeout=60, headers=AUTH) as c:
        with c.stream("POST", small_server.url + "/v1/chat/completions", json=body) as running, \
             c.stream("POST", small_server.url + "/v1/chat/completions", json=body) as queued:
            assert running.status_code == queued.status_code == 200
            next(running.iter_lines())
            r = c.post(small_server.url + "/v1/chat/completions", json=body)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "server_overloaded" and "busy" in r.json()["error"]["message"]
    queue = _wait_idle(small_server)
    assert (queue["rejected"], queue["cancelled"], queue["failed"]) == (1, 2, 0)


def test_preempted_generations_resume_with_their_own_answers(tiny_model, engine):
    """With state memory for about two of four sequences, the newest are preempted (their states
    freed) and resumed, recomputed from their tokens, and every client still gets, token for token,
    what its prompt gives alone."""
    from flashmoe.runtime.prefix_cache import state_bytes

    state = engine.new_state()
    engine.forward(list(range(3, 60)), state)
    budget = int(2.5 * state_bytes(state.clone()))  # as the server's: cloned from its prefix cache, KV caches trimmed
    greedy = {"max_tokens": 24, "temperature": 0}
    server = Server(tiny_model, "--dtype", "float32", "--parallel", "4", "--state-mem", str(budget))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
            expected = [http.post("/v1/chat/completions", json={"messages": p, **greedy}).json()["choices"][0]["message"][
                "content"] for p in PROMPTS]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda p: _stream(server.url, {"messages": p, **greedy}), PROMPTS))
        assert [r["text"] for r in results] == expected
        queue = _wait_idle(server)
        assert queue["preempted"] > 0 and queue["paused"] == 0 and queue["failed"] == 0, json.dumps([queue, budget])
    finally:
        server.stop()


def test_decode_reads_per_token(server, engine):
    """/health's `decode` counts the expert records the decode steps read: a lone sequence's step
    reads its top-k experts in every MoE layer; a batch's step each expert its tokens share once.
    It times the decode rounds too: a round takes longer than its forward, the host's part."""
    per_token = len(engine.moe_layers) * engine.top_k
    greedy = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    _wait_idle(server)
    before = server.health()["decode"]
    _stream(server.url, {"messages": PROMPTS[0], **greedy})
    _wait_idle(server)
    lone = server.health()["decode"]
    assert lone["tokens"] - before["tokens"] == 11  # the first token comes from the prefill
    assert lone["expert_records"] - before["expert_records"] == 11 * per_token
    assert lone["expert_bytes"] - before["expert_bytes"] == 11 * per_token * engine.manifest.layout.record_size
    assert lone["rounds"] - before["rounds"] == 11
    forward, round_ = (lone[k] - before[k] for k in ("forward_seconds", "round_seconds"))
    assert 0 < forward < round_
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: _stream(server.url, {"messages": p, **greedy}), PROMPTS))
    _wait_idle(server)
    batched = server.health()["decode"]
    assert batched["tokens"] - lone["tokens"] == 4 * 11
    assert 0 < batched["expert_records"] - lone["expert_records"] <= 4 * 11 * per_token
    assert 11 <= batched["rounds"] - lone["rounds"] < 4 * 11  # the steps ran together
