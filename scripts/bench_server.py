"""What `flashmoe serve` costs and what it saves, measured against the Engine called directly.

  1. Server overhead per token: the time between streamed tokens of one /v1/completions client
     against the Engine's own time between tokens (same prompt, greedy, same process settings).
  2. Throughput and per-request latency with 1, 4 and 16 concurrent chat clients.
  3. Second-turn time to first token of a conversation with a long system prompt, with the prefix
     cache and without it (`--prefix-cache 0`): the latency of a one-token answer.
  4. The cost of grammar-constrained decoding: tokens of a JSON-schema answer against free text.

Usage: python scripts/bench_server.py [--model flashmoe/demo_model] [--json out.json]
The streaming and concurrency helpers here also drive scripts/bench_s5.py (scenario S5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from flashmoe.demo import DEMO_MODEL
from flashmoe.engine import Engine

PROMPT = "The expert weights stream from disk because"
SYSTEM = " ".join(f"Rule {i}: answer precisely, cite the rule you used, and keep the tone friendly." for i in range(120))


class Server:
    """`flashmoe serve --model MODEL --port PORT ARGS...`, once /health answers (a large model takes
    minutes to load: `wait_s`). Its output goes to `log` (default: a temporary file), shown if it
    exits early."""

    def __init__(self, model: Path, port: int, *args: str, wait_s: float = 120, log: Path | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "flashmoe", "serve", "--model", str(model), "--port", str(port), *args]
        self.log = open(log, "w+b") if log else tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                output = self.log.read().decode(errors="replace")[-4000:]
                raise RuntimeError(f"flashmoe serve exited ({self.proc.returncode}):\n{output}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flashmoe serve did not answer /health within {wait_s:.0f} s")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def direct_run(engine, tokens: int) -> float:
    """ms between tokens of one greedy generation, called in this process."""
    from flashmoe.runtime.sampling import SamplingParams

    stamps = [time.perf_counter() for _ in engine.generate(PROMPT, SamplingParams(max_tokens=tokens))]
    return (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)


# One client for every request, its connections kept alive: a client of its own per request (what
# `httpx.stream` makes) builds an SSL context, ~20 ms of CPU under the GIL, so sixteen streams
# started at once went out one after another over ~0.35 s, and that delay was timed as the
# server's time to first token (EXPERIMENTS 109).
CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


def stream(url: str, path: str, body: dict) -> dict:
    """One streamed request: time to the first token, between tokens, in all; tokens generated;
    the arrival time of each chunk that carried text (`stamps`, perf_counter seconds); the message
    of an error event that ended it (`error`, else None)."""
    t0 = time.perf_counter()
    first = last = error = None
    usage, stamps = {}, []
    with CLIENT.stream("POST", url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"].get("message", str(chunk["error"]))
            usage = chunk.get("usage") or usage
            choice = (chunk.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                last = time.perf_counter()
                first = first or last
                stamps.append(last)
    n = usage.get("completion_tokens", 0)
    return {"ttft": (first or t0) - t0, "total": time.perf_counter() - t0, "tokens": n, "stamps": stamps, "usage": usage,
            "error": error,
            "ms_per_token": (last - first) * 1e3 / (n - 1) if first and n > 1 else float("nan")}


def overhead(engine, url: str, tokens: int, repeats: int) -> dict:
    """Engine and server runs alternated, so that both see the same machine (others' load drifts)."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    direct_run(engine, 8)
    stream(url, "/v1/completions", {**body, "max_tokens": 8})  # both warm: expert caches filled
    pairs = [(direct_run(engine, tokens), stream(url, "/v1/completions", body)["ms_per_token"]) for _ in range(repeats)]
    return {"engine_ms_per_token": statistics.median(d for d, _ in pairs),
            "server_ms_per_token": statistics.median(s for _, s in pairs),
            "overhead_ms_per_token": statistics.median(s - d for d, s in pairs)}


def concurrency(url: str, clients: int, tokens: int, **extra) -> dict:
    """`clients` streamed greedy chat requests of `tokens` tokens at once (`extra`: more request
    fields, e.g. ignore_eos). tok_per_s: every token over the wall time, prefills included;
    decode_tok_per_s: the tokens after each stream's first, from the first first token to the last
    token. Inter-token latency: the gaps between a stream's text chunks, all streams pooled."""
    def one(i: int) -> dict:
        body = {"messages": [{"role": "user", "content": f"Client {i}: tell me about topic {i}."}],
                "max_tokens": tokens, "temperature": 0, **extra}
        return stream(url, "/v1/chat/completions", body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    latency = sorted(r["total"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = np.concatenate([np.diff(r["stamps"]) for r in results]) * 1e3
    stamps = [r["stamps"] for r in results if r["stamps"]]
    decode_span = max(s[-1] for s in stamps) - min(s[0] for s in stamps) if stamps else 0.0
    decoded = sum(max(r["tokens"] - 1, 0) for r in results)
    return {"clients": clients, "tokens": sum(r["tokens"] for r in results),
            "short_streams": sum(r["tokens"] < tokens for r in results),  # ended before `tokens` (EOS, stop, error)
            "errors": sorted({r["error"] for r in results if r["error"]}),
            "tok_per_s": sum(r["tokens"] for r in results) / wall,
            "decode_tok_per_s": decoded / decode_span if decode_span > 0 else float("nan"),
            "latency_mean_s": statistics.mean(latency), "latency_max_s": latency[-1],
            "ttft_median_s": statistics.median(ttft),
            "ttft_p90_s": float(np.percentile(ttft, 90)),
            **{f"itl_p{q}_ms": float(np.percentile(gaps, q)) if gaps.size else float("nan") for q in (50, 90, 99)}}


def second_turn_ttft(url: str, repeats: int) -> dict:
    """Median latency of a one-token second turn (first turn answered, then a follow-up)."""
    times, usage = [], {}
    for i in range(repeats):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}: what is rule {i}?"}]
        first = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 16, "temperature": 0},
                           timeout=600).json()
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And the next one?"}]
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=600)
        times.append(time.perf_counter() - t0)
        usage = r.json()["usage"]
    return {"seconds": statistics.median(times), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def grammar_cost(url: str, tokens: int) -> dict:
    base = {"messages": [{"role": "user", "content": "Write a long string."}], "max_tokens": tokens, "temperature": 0}
    schema = {"type": "string", "minLength": 10 * tokens}  # cannot end early: every step is constrained
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    free = stream(url, "/v1/chat/completions", base)
    constrained = stream(url, "/v1/chat/completions", {**base, "response_format": fmt})
    return {"free_ms_per_token": free["ms_per_token"], "json_schema_ms_per_token": constrained["ms_per_token"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    out: dict = {"model": str(args.model)}
    engine = Engine(args.model)
    server = Server(args.model, args.port)
    try:
        out["overhead"] = o = overhead(engine, server.url, args.tokens, args.repeats)
        engine.close()
        print(f"per token: engine {o['engine_ms_per_token']:.1f} ms, server (streamed) {o['server_ms_per_token']:.1f} ms, "
              f"overhead {o['overhead_ms_per_token']:+.1f} ms (median of paired runs)", flush=True)
        out["concurrency"] = [concurrency(server.url, n, args.tokens // 2) for n in (1, 4, 16)]
        for c in out["concurrency"]:
            print(f"{c['clients']:>2} clients: {c['tok_per_s']:.1f} tok/s in all, latency mean {c['latency_mean_s']:.1f} s "
                  f"max {c['latency_max_s']:.1f} s, median time to first token {c['ttft_median_s']:.2f} s", flush=True)
        out["grammar"] = g = grammar_cost(server.url, args.tokens)
        print(f"grammar: free text {g['free_ms_per_token']:.1f} ms/token, JSON schema {g['json_schema_ms_per_token']:.1f} ms/token",
              flush=True)
        out["second_turn_reuse"] = second_turn_ttft(server.url, args.repeats)
    finally:
        server.stop()
    server = Server(args.model, args.port, "--prefix-cache", "0")
    try:
        out["second_turn_no_reuse"] = second_turn_ttft(server.url, args.repeats)
    finally:
        server.stop()
    a, b = out["second_turn_reuse"], out["second_turn_no_reuse"]
    print(f"second turn ({a['prompt_tokens']} prompt tokens), time to first token: {a['seconds']:.2f} s with prefix reuse "
          f"({a['cached_tokens']} tokens reused), {b['seconds']:.2f} s without", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
