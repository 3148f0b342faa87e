"""`flashmoe serve`: load one model and serve it over HTTP."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from ..cli_common import PORT_OPTION, engine_options
from ..config import EngineConfig


@engine_options()
def serve_command(
    model: Path = typer.Option(..., "--model", "-m", help="Packed model directory (from flashmoe convert)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback exposes the model: it needs --api-key."),
    port: int = PORT_OPTION,
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="FLASHMOE_API_KEY",
        help="Require this key on /v1/ routes (Authorization: Bearer KEY, or x-api-key). Prefer the environment variable "
        "FLASHMOE_API_KEY: a command-line key is visible to other local users.",
    ),
    insecure_no_key: bool = typer.Option(
        False, "--insecure-no-key",
        help="Listen on a non-loopback --host without an API key: anyone who can reach it can use the model.",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Model id reported by /v1/models (default: the directory name)."),
    parallel: int = typer.Option(8, help="Generations in progress at once: each step decodes one token of each, as one batch."),
    max_queue: int = typer.Option(32, "--max-queue", help="Requests waiting beyond --parallel; past it the answer is 503."),
    prefix_cache: str = typer.Option("2G", "--prefix-cache", help="Memory for states of conversation prefixes reused by the next turn (0 = off)."),
    state_mem: Optional[str] = typer.Option(
        None, "--state-mem",
        help="Memory the running generations' states (KV caches, DeltaNet states) may take, e.g. 4G: past it the newest "
        "are preempted (state freed) and resumed, recomputed from their tokens, when there is room (default: no limit)."),
    max_body: str = typer.Option("8M", "--max-body", help="Largest request body accepted (413 past it)."),
    replay_trace: Optional[Path] = typer.Option(
        None, "--replay-trace", hidden=True,
        help="Benchmarks only (scenario S5): route every MoE layer by streams generated from this routing trace "
        "(flashmoe trace) instead of the router, expert ids shuffled; a batch's sequences each follow a stream of their own."),
    config: EngineConfig = None,
):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, tools, JSON output) and Anthropic's Messages API."""
    from dataclasses import replace

    import uvicorn

    from ..cli_common import USER_ERRORS, err, fail, open_engine, sampling_defaults
    from ..utils import parse_size
    from .app import create_app
    from .http import is_loopback
    from .service import ModelService

    if not api_key and not is_loopback(host) and not insecure_no_key:  # before the minutes a model takes to load
        fail(ValueError(f"--host {host} exposes the model beyond this machine: set an API key (FLASHMOE_API_KEY or "
                        "--api-key), or pass --insecure-no-key to serve anyone who can reach it"))
    try:
        state_bytes = None if state_mem is None else parse_size(state_mem)
        if state_bytes == 0:
            raise ValueError("--state-mem must be a size above 0 (leave it out for no limit)")
        engine = open_engine(model, replace(config, decode_slots=parallel))  # a batch's states in slots
        service = ModelService(engine, name or model.resolve().name, sampling_defaults(model),
                               parse_size(prefix_cache), parallel, max_queue, state_bytes)
        app = create_app(service, api_key, parse_size(max_body), host, port)
        routing = nullcontext() if replay_trace is None else _replayed(engine, replay_trace, parallel)
    except USER_ERRORS as e:
        fail(e)
    if not api_key and not is_loopback(host):
        err.print(f"[bold yellow]warning:[/] listening on {host} without an API key (--insecure-no-key): anyone who can "
                  "reach it can use the model")
    err.print(f"serving {service.name} on http://{host}:{port}/v1 (context {engine.context_length} tokens)")
    with routing:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


REPLAY_ROWS = 1 << 16  # rows of the replayed stream: each of up to --parallel sequences cycles through its share


def _replayed(engine, trace_path: Path, parallel: int):
    """The routing of `--replay-trace`: a stream with the trace's locality at this model's shape
    (analysis/locality.fit_replay), each running sequence reading its own part of it."""
    from ..analysis.locality import fit_replay
    from ..analysis.routing_trace import RoutingTrace, replayed_routing

    trace = RoutingTrace.load(trace_path)
    gen = fit_replay(trace.ids, trace.num_experts, engine.args.moe.num_experts, engine.top_k)
    return replayed_routing(engine, gen, REPLAY_ROWS, shuffled=True, spread=REPLAY_ROWS // parallel)
