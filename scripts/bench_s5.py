"""Scenario S5: `flashmoe serve` under concurrent streams, driven over HTTP.

Starts `flashmoe serve` on MODEL (everything after `--` goes to serve as is: --device cuda
--parallel 32 ...), then for each number of concurrent streams runs a warm-up round and a measured
round of streamed greedy chat requests that each generate --tokens tokens (ignore_eos: end-of-
sequence tokens do not end them). Per round it reports the aggregate throughput, time to first
token (TTFT) p50/p90, inter-token latency (ITL) p50/p90/p99 from the arrival of each stream's text
chunks, and the expert bytes the decode steps read per decoded token (the server's /health
`decode` counters: records the expert store handed out, which a batch reads once for all the
tokens that share them; prefills not counted), and a decode round's milliseconds split into the
forward's and the host's (the jobs' bookkeeping and events: what a batch does not share). With --long-prompt N it then measures the TTFT of a
short request sent while a prompt of about N tokens is being prefilled, beside that short
request's TTFT on an idle server and the long prompt's own.

  python scripts/bench_s5.py flashmoe/demo_model --streams 1 2 4 --tokens 16 --long-prompt 2048
  python scripts/bench_s5.py /tmp/flashmoe-bench/qwen3-next-80b-L48-4bit --long-prompt 32768 \\
      --json s5.json -- --device cuda --parallel 32

Serve's --parallel (default 8) is how many streams decode together: more streams wait in its queue.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from math import nan
from pathlib import Path

from bench_server import Server, concurrency, stream
from flashmoe.demo import DEMO_MODEL, HELDOUT_TEXT
from flashmoe.tokenizer import Tokenizer
from flashmoe.utils import format_bytes

CHAT = "/v1/chat/completions"
SHORT = {"messages": [{"role": "user", "content": "A short question: what is a list?"}], "max_tokens": 4,
         "temperature": 0, "ignore_eos": True}


def decode_stats(before: dict, after: dict) -> dict:
    """/health `decode` counters between two readings: reads per decoded token; a decode round's
    milliseconds, and of them the forward's and the host's (the rest of the round)."""
    d = {k: after[k] - before[k] for k in before}
    n, rounds = d["tokens"], d["rounds"]
    per_round = {"round_ms": d["round_seconds"] * 1e3 / rounds, "forward_ms": d["forward_seconds"] * 1e3 / rounds,
                 "host_ms": (d["round_seconds"] - d["forward_seconds"]) * 1e3 / rounds} if rounds else {}
    return {"decoded_tokens": n, "decode_rounds": rounds, **per_round,
            **{f"{k}_per_token": d[k] / n if n else float("nan")
               for k in ("expert_records", "expert_bytes", "disk_bytes", "gpu_bytes_copied")}}


def streams_round(server: Server, clients: int, tokens: int, warmup_tokens: int) -> dict:
    concurrency(server.url, clients, warmup_tokens, ignore_eos=True)  # caches, allocations and kernels of this batch size
    before = server.health()["decode"]
    out = concurrency(server.url, clients, tokens, ignore_eos=True)
    return {**out, **decode_stats(before, server.health()["decode"])}


def prompt_of(tokenizer: Tokenizer, tokens: int) -> str:
    """User text whose chat prompt is about `tokens` tokens: held-out Python source, repeated as
    needed, cut to length (decoding and encoding again may move the count by a few tokens)."""
    source = HELDOUT_TEXT.read_text(encoding="utf-8")
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer.encode(source)
    overhead = len(tokenizer.encode_chat([{"role": "user", "content": ""}], add_generation_prompt=True))
    return tokenizer.decode(ids[: max(tokens - overhead, 1)])


def long_prompt(server: Server, model: Path, tokens: int, context: int) -> dict:
    """TTFT of SHORT alone, then sent once a chat request of about `tokens` prompt tokens has been
    admitted (its prefill runs from then on, a slice of generation.PREFILL_SLICE tokens per
    scheduler round), and that one's TTFT. Both TTFTs count from each request's own sending."""
    alone = stream(server.url, CHAT, SHORT)["ttft"]
    text = prompt_of(Tokenizer.from_dir(model), tokens)
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0}
    results: dict = {}
    runner = threading.Thread(target=lambda: results.update(long=stream(server.url, CHAT, body)))
    t_long = time.perf_counter()
    runner.start()
    while server.health()["queue"]["active"] == 0 and runner.is_alive():  # waits for the admission
        time.sleep(0.005)
    t_short = time.perf_counter()
    short = stream(server.url, CHAT, SHORT)
    runner.join()
    long = results["long"]
    if not long["stamps"] or not short["stamps"]:
        raise RuntimeError("a request of the long-prompt measurement produced no text (an error?)")
    return {"prompt_tokens": long["usage"]["prompt_tokens"], "context_length": context, "long_ttft_s": long["ttft"],
            "short_ttft_s": short["ttft"], "short_ttft_idle_s": alone, "short_sent_after_s": t_short - t_long}


def print_table(rows: list[dict]) -> None:
    print(f"{'streams':>7} {'tok/s':>7} {'decode':>7} {'TTFT p50':>9} {'p90':>7} {'ITL p50':>8} {'p90':>7} {'p99':>7} "
          f"{'experts/token':>13} {'disk/token':>11} {'short':>5} {'round ms':>8} {'forward':>7} {'host':>6}")
    for r in rows:
        print(f"{r['clients']:>7} {r['tok_per_s']:>7.1f} {r['decode_tok_per_s']:>7.1f} {r['ttft_median_s']:>8.2f}s "
              f"{r['ttft_p90_s']:>6.2f}s {r['itl_p50_ms']:>6.0f}ms {r['itl_p90_ms']:>5.0f}ms {r['itl_p99_ms']:>5.0f}ms "
              f"{format_bytes(r['expert_bytes_per_token']):>13} {format_bytes(r['disk_bytes_per_token']):>11} "
              f"{r['short_streams']:>5} {r.get('round_ms', nan):>8.2f} {r.get('forward_ms', nan):>7.2f} "
              f"{r.get('host_ms', nan):>6.2f}", flush=True)
    for error in sorted({e for r in rows for e in r["errors"]}):
        print(f"error: {error}", flush=True)


def main() -> None:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [MODEL] [options] [-- SERVE_ARGS...]")
    ap.add_argument("model", type=Path, nargs="?", default=DEMO_MODEL, help="packed model directory (default: the demo model)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="concurrent streams per round")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each stream generates (default 64)")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="tokens per stream of each warm-up round (default 8)")
    ap.add_argument("--long-prompt", type=int, metavar="TOKENS",
                    help="also measure a short request's TTFT while a prompt of about TOKENS tokens is prefilled")
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--startup-timeout", type=float, default=1800, help="seconds to wait for the model to load")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--server-log", type=Path, help="keep the server's output here (default: shown only if it exits early)")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    server = Server(args.model, args.port, *serve_args, wait_s=args.startup_timeout, log=args.server_log)
    try:
        health = server.health()
        queue, context = health["queue"], health["context_length"]
        out: dict = {"model": str(args.model), "serve_args": serve_args, "tokens": args.tokens,
                     "parallel": queue["parallel"], "context_length": context, "rounds": []}
        print(f"{args.model}: serve {' '.join(serve_args) or '(defaults)'}; --parallel {queue['parallel']}, "
              f"context {context} tokens; {args.tokens} tokens per stream", flush=True)
        for n in args.streams:
            if n > queue["parallel"] + queue["max_queue"]:
                print(f"{n} streams: skipped, past --parallel + --max-queue ({queue['parallel'] + queue['max_queue']}): "
                      "the rest would get 503", flush=True)
                continue
            if n > queue["parallel"]:
                print(f"{n} streams: {n - queue['parallel']} wait in the queue (--parallel {queue['parallel']})", flush=True)
            out["rounds"].append(streams_round(server, n, args.tokens, args.warmup_tokens))
        print_table(out["rounds"])
        if args.long_prompt:
            if args.long_prompt >= context:
                out["long_prompt"] = {"skipped": f"{args.long_prompt} tokens do not fit the context of {context} tokens"}
                print(f"long prompt: skipped, {args.long_prompt} tokens do not fit this model's context of {context} tokens",
                      flush=True)
            else:
                out["long_prompt"] = lp = long_prompt(server, args.model, args.long_prompt, context)
                print(f"long prompt of {lp['prompt_tokens']} tokens: its TTFT {lp['long_ttft_s']:.2f} s; a short request "
                      f"sent {lp['short_sent_after_s']:.2f} s after it: TTFT {lp['short_ttft_s']:.2f} s (on an idle server "
                      f"{lp['short_ttft_idle_s']:.2f} s)", flush=True)
        out["health"] = server.health()
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
