"""The `flashmoe` command: a thin layer over convert() and the Engine."""

from __future__ import annotations

import sys
from contextlib import closing
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .chat import chat_command
from .cli_common import (
    SEED_OPTION,
    TEMPERATURE_OPTION,
    TOP_K_OPTION,
    TOP_P_OPTION,
    USER_ERRORS,
    check_output_path,
    engine_options,
    err,
    fail,
    open_engine,
    parse_size,
    prompt_text,
    sampling_params,
    write_output,
)
from .config import EngineConfig
from .server import serve_command
from .utils import format_bytes

app = typer.Typer(
    help="Run Mixture-of-Experts models far larger than memory: experts stream from disk into budgeted caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
@app.command()
def convert(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors shards)."),
    dst: Path = typer.Argument(..., help="Output directory for the packed model (must not exist, nor be or hold SRC)."),
    bits: Optional[int] = typer.Option(
        None, help="Expert weight bits: 16 (unquantized), 8, 4 or 2. Default: quantized experts kept as stored (gpt-oss's MXFP4, mlx-lm's groups), others 4."
    ),
    group_size: int = typer.Option(
        64, help="Weights per quantization group (one 16-bit scale and bias each): a power of two, e.g. 32, 64 or 128."
    ),
    ngram_bits: Optional[int] = typer.Option(
        None, help="N-gram table rows (Qwen3.8-Flash-Next): 16 (the checkpoint's values) or 8 (int8 and a scale per row: half the disk). Default: 16 with --bits 16, else 8."
    ),
    force: bool = typer.Option(
        False,
        help="Replace DST if it is a model an earlier convert wrote, holding nothing else (swapped once the new one is complete).",
    ),
):
    """Convert a checkpoint once into the packed format: 16-bit dense weights, one aligned record per expert."""
    from .convert import convert as run_convert

    try:
        report = run_convert(src, dst, bits=bits, group_size=group_size, force=force, console=err, ngram_bits=ngram_bits)
    except KeyboardInterrupt:
        err.print("interrupted: no partial model was left (a model at DST is replaced only by a complete one)")
        raise typer.Exit(130)
    except USER_ERRORS as e:
        fail(e)
    err.print(
        f"wrote {escape(str(dst))} in {report.seconds:.1f} s: experts {format_bytes(report.expert_bytes)}, "
        f"dense {format_bytes(report.dense_bytes)}"
        + (f", n-gram tables {format_bytes(report.ngram_bytes)}" if report.ngram_bytes else "")
    )
    err.print(f"experts: {report.experts}; relative error ||w - stored|| / ||w|| by tensor kind:")
    for kind, e in sorted(report.relative_errors().items()):
        err.print(f"  {kind:<24} {e:.2e}")
    for warning in report.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _stream(engine, prompt, params) -> None:
    """Print the continuation to stdout as it is produced; the summary goes to stderr."""
    gen = engine.generate(prompt, params)
    if gen.max_tokens < params.max_tokens:  # the context ends first: say so, and generate what fits
        err.print(
            f"[yellow]note:[/] --tokens {params.max_tokens} reaches past the model's context of {engine.context_length} "
            f"tokens (the prompt takes {len(gen.ids)}): generating at most {gen.max_tokens}",
            soft_wrap=True,
        )
    try:
        for step in gen:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        err.print("\n[interrupted]")
    sys.stdout.write("\n")
    print_summary(engine, gen.stats)


LAYER_SECTIONS = [
    ("ngram_wait", "n-gram wait"),
    ("mixer", "mixer"),
    ("moe_step", "MoE step"),
    ("routing", "routing"),
    ("shared_expert", "shared expert"),
    ("dense_mlp", "dense MLP"),
    ("expert_io", "expert I/O"),
    ("expert_compute", "expert compute"),
]


def print_summary(engine, stats) -> None:
    """The live summary: throughput, where the time of a decoded token goes, cache behaviour, memory."""
    err.print(
        f"[dim]prefill[/] {stats.prompt_tokens} tok in {stats.prefill_seconds:.2f} s ({stats.prefill_tps:.1f} tok/s)"
        f"   [dim]decode[/] {stats.decode_tokens} tok in {stats.decode_seconds:.2f} s ({stats.decode_tps:.2f} tok/s)",
        soft_wrap=True,
    )
    if not stats.decode_tokens:
        return
    n, layers = stats.decode_tokens, engine.args.num_hidden_layers
    s = stats.decode_sections
    in_layers = sum(s.get(key, 0.0) for key, _ in LAYER_SECTIONS)
    parts = [f"{label} {s[key] * 1e3 / (n * layers):.3f}" for key, label in LAYER_SECTIONS if key in s]
    err.print(
        f"[dim]per token[/] {stats.decode_seconds * 1e3 / n:.1f} ms = {layers} layers x {in_layers * 1e3 / (n * layers):.2f} ms"
        f" + outside layers {(stats.decode_seconds - in_layers) * 1e3 / n:.2f} ms (embedding, lm_head, sampling)",
        soft_wrap=True,
    )
    err.print("[dim]per layer (ms)[/] " + " | ".join(parts), soft_wrap=True)
    c = stats.cache
    err.print(
        f"[dim]expert cache[/] {c.hit_rate:.1%} hits in decode, {format_bytes(c.bytes_read / n)} read per token, "
        f"budget {format_bytes(engine.host_cache_bytes)}"
        f"   [dim]prefill read[/] {format_bytes(stats.prefill_cache.bytes_read)}"
        f"   [dim]peak RSS[/] {format_bytes(stats.peak_rss)}",
        soft_wrap=True,
    )
    if (g := stats.ngrams).rows:
        err.print(
            f"[dim]n-gram rows[/] {g.reads / n:.1f} reads, {format_bytes(g.bytes_read / n)} per token, "
            f"{g.hits / g.rows:.1%} cached, {s.get('ngram_wait', 0.0) * 1e3 / n:.2f} ms waited per token, "
            f"budget {format_bytes(engine.ngram_rows.cached_bytes)}",
            soft_wrap=True,
        )


@app.command()
@engine_options()
def generate(
    model: Path = typer.Option(..., "--model", "-m", help="Packed model directory (from flashmoe convert)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text; '-' reads it from stdin."),
    tokens: int = typer.Option(128, "--tokens", "-n", help="Maximum new tokens (fewer, with a note, where the context ends)."),
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: Optional[int] = SEED_OPTION,
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as a user turn in the chat template."),
    think: bool = typer.Option(False, "--think", help="With --chat: let the model think before answering."),
    config: EngineConfig = None,
):
    """Generate a continuation of a prompt, streaming it to stdout; statistics go to stderr."""
    try:
        prompt = prompt_text(prompt)
        params = sampling_params(  # before the model loads: a bad value fails at once
            model, temperature, top_p, top_k, max_tokens=tokens, repetition_penalty=repetition_penalty, seed=seed, stop=stop
        )
        with closing(open_engine(model, config)) as engine:
            if chat:
                prompt = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}], enable_thinking=think)
            _stream(engine, prompt, params)
    except USER_ERRORS as e:
        fail(e)


@app.command()
@engine_options(host_mem="4M", device="cpu")  # below the model's 14 MiB of experts, so they stream
def demo(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt (default: the start of a Python function)."),
    tokens: int = typer.Option(96, "--tokens", "-n", help="Maximum new tokens."),
    chat: bool = typer.Option(False, "--chat", help="Ask the prompt as a chat question instead of completing code."),
    temperature: Optional[float] = TEMPERATURE_OPTION,
    seed: Optional[int] = SEED_OPTION,
    config: EngineConfig = None,
):
    """Run the bundled demo model (a small Qwen3.5-MoE trained on Python's standard library) with live statistics."""
    from .demo import DEMO_MODEL, DEMO_PROMPT

    try:
        engine = open_engine(DEMO_MODEL, config)
        err.print(
            f"[dim]demo model: {DEMO_MODEL} (Qwen3.5-MoE architecture, 30M parameters trained on the Python standard "
            f"library; {format_bytes(engine.manifest.total_expert_bytes)} of 4-bit experts streamed through a "
            f"{format_bytes(engine.host_cache_bytes)} cache)[/]"
        )
        text = prompt if prompt is not None else ("What does json.dumps do?" if chat else DEMO_PROMPT)
        if chat:
            text = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
        else:
            sys.stdout.write(text)  # a completion reads as code only with the text it completes
        params = sampling_params(DEMO_MODEL, temperature, max_tokens=tokens, seed=seed)
        _stream(engine, text, params)
    except USER_ERRORS as e:
        fail(e)


@app.command()
@engine_options()
def trace(
    model: Path = typer.Option(..., "--model", "-m", help="Packed model directory (from flashmoe convert)."),
    data: Path = typer.Option(..., "--data", help="Text file whose tokens are fed through the model."),
    out: Path = typer.Option(..., "--out", "-o", help="Trace file to write (.npz)."),
    tokens: int = typer.Option(8192, "--tokens", "-n", help="Record the first N tokens of the text."),
    config: EngineConfig = None,
):
    """Record which experts each token of a text uses at every MoE layer (teacher-forced), for bench --trace."""
    from .analysis.locality import WINDOWS, load_entropy, reuse_profile, sorted_shares
    from .analysis.routing_trace import record

    try:
        if not data.is_file():
            raise FileNotFoundError(f"--data {data} is not a file")
        if tokens <= max(WINDOWS):
            raise ValueError(f"--tokens {tokens} is too few: a trace needs more than {max(WINDOWS)} tokens")
        check_output_path(out, "--out")
        engine = open_engine(model, config)
        ids = engine.tokenizer.encode(data.read_text(encoding="utf-8", errors="replace"))[:tokens]
        if len(ids) <= max(WINDOWS):
            raise ValueError(f"--data {data} has {len(ids)} tokens; a trace needs more than {max(WINDOWS)}")
        result = record(engine, ids, data.name, progress=lambda done: err.print(f"  {done} / {len(ids)} tokens"))
        result.save(out)
    except USER_ERRORS as e:
        fail(e)
    entropy, reuse = load_entropy(sorted_shares(result.ids, result.num_experts)), reuse_profile(result.ids)
    err.print(
        f"wrote {escape(str(out))}: {result.tokens} tokens x {result.layers} MoE layers x k={result.k} of {result.num_experts} experts"
    )
    err.print("layer  load entropy / log E  " + "  ".join(f"reuse w={w:<3}" for w in WINDOWS))
    for i, (h, row) in enumerate(zip(entropy, reuse)):
        err.print(f"{i:>5}  {h:>20.3f}  " + "  ".join(f"{u:>11.1%}" for u in row))
    err.print(
        f" mean  {entropy.mean():>20.3f}  " + "  ".join(f"{u:>11.1%}" for u in reuse.mean(0))
        + f"   (uniform routing: entropy 1, reuse w=1 {result.k / result.num_experts:.1%})",
        soft_wrap=True,
    )


@app.command()
def bench(
    preset: str = typer.Option("qwen3.5-397b-a17b", help="Model shape, a released model: qwen3.5-397b-a17b, qwen3.5-122b-a10b, qwen3.6-35b-a3b, "
        "qwen3-next-80b-a3b, qwen3-30b-a3b, qwen3-235b-a22b, qwen3-coder-480b-a35b, minimax-m2, glm-4.5, "
        "gpt-oss-120b, gpt-oss-20b or qwen3.8-flash-next (its n-gram table synthesized at 1/8 of its rows, so it fits "
        "the disk; its decode runs eagerly, without CUDA graphs)."),
    layers: int = typer.Option(8, help="Slice of the first L layers (budgets scale by L / all layers)."),
    bits: int = typer.Option(4, help="Expert bits: 8, 4, 2 or 16."),
    k: list[int] = typer.Option([10, 4], "--k", help="Experts per token to run (repeatable)."),
    prompt_tokens: int = typer.Option(32, "--prompt", help="S1 prompt length."),
    tokens: int = typer.Option(128, help="S1 decode tokens."),
    prefill: list[int] = typer.Option([512, 2048], "--prefill", help="S2 prompt lengths (repeatable; 0 to skip)."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="GPU expert tier for the FULL model (default: GPU memory - dense - margin)."),
    host_mem: Optional[str] = typer.Option(None, "--host-mem", help="Host expert tier for the FULL model (default: RAM - reserve)."),
    dense_bits: int = typer.Option(16, "--dense-bits", help="Resident dense weights of the benchmarked engine: 16 or 8 (int8, as flashmoe generate --dense-bits 8)."),
    workdir: Path = typer.Option(Path("/tmp/flashmoe-bench"), help="Where the synthesized model is written (reused)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report as JSON here."),
    trace_file: Optional[Path] = typer.Option(
        None, "--trace", help="Routing trace (flashmoe trace): also run S1 with its locality replayed, beside uniform routing."
    ),
    prefetch: bool = typer.Option(False, "--prefetch", help="Also run S1 with next-layer prefetch, beside the plain rows."),
    cpu_experts: list[int] = typer.Option([], "--cpu-experts", help="Also run S1 with up to N host-resident experts per layer computed on the CPU; with --preload only in the resident rows, as copying them is a known loss (repeatable; needs numba)."),
    preload: bool = typer.Option(False, "--preload", help="Also run S1/S2 with every expert read where it lies (no disk tier only), beside the plain rows."),
    adaptive: bool = typer.Option(False, "--adaptive", help="With --preload: also run resident rows whose placement adapts to use (what --cache-policy mix does with --preload): uniform, and with --trace the replay with shuffled expert ids, static and adaptive."),
    warmup: int = typer.Option(2048, "--warmup", help="Tokens decoded before timing an adaptive replay row (its placement learns meanwhile)."),
    ngram_bits: Optional[int] = typer.Option(None, "--ngram-bits", help="N-gram table rows (qwen3.8-flash-next): 16 or 8, as flashmoe convert --ngram-bits (default as its: 16 with --bits 16, else 8)."),
):
    """Benchmark scenarios S1 (decode) and S2 (prefill) on a synthesized model of a named shape (GPU)."""
    import torch

    from .bench import result_json, run

    if not torch.cuda.is_available():
        fail(RuntimeError("flashmoe bench measures the GPU path and PyTorch sees no CUDA GPU"))
    try:
        if json_out:
            check_output_path(json_out, "--json")
        report = run(
            preset, layers, bits, k, prompt_tokens, tokens, [n for n in prefill if n], workdir,
            None if gpu_mem is None else parse_size(gpu_mem), None if host_mem is None else parse_size(host_mem), trace_file,
            dense_bits, prefetch, cpu_experts, preload, adaptive, warmup, ngram_bits, log=lambda line: err.print(line, soft_wrap=True),
        )
    except USER_ERRORS as e:
        fail(e)
    text = result_json(**report)
    print(text)
    write_output(json_out, text)


@app.command("eval")
@engine_options()
def eval_command(
    model: Path = typer.Option(..., "--model", "-m", help="Packed model directory to evaluate."),
    data: Path = typer.Option(..., "--data", help="Held-out UTF-8 text for perplexity (and the comparison)."),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="Packed model to compare with, e.g. the same at 16 bits: KL and top-1 agreement."
    ),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help='JSONL prompt set, {"messages": [...], "tools": [...]} a line: structured-output validity.'
    ),
    window: int = typer.Option(512, help="Tokens per scoring window (each window's first token is context only)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most this many tokens (default: the whole text)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens generated per prompt (greedy)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every number as JSON here."),
    config: EngineConfig = None,
):
    """Measure what quantization and a smaller K cost: perplexity, KL and top-1 against a reference, structured-output validity.

    --k applies to --model only; the reference keeps its own."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import evaluate

    try:
        if json_out:
            check_output_path(json_out, "--json")
        text = evaluate.read_text(data)
        prompt_set = evaluate.load_prompts(prompts) if prompts else []  # bad input fails before any model loads
        engine = open_engine(model, config)
        ref = open_engine(reference, config.but(k=None)) if reference else None
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as bar:

            def track(description: str) -> evaluate.ProgressCallback:
                task = bar.add_task(description, total=None)
                return lambda done, total: bar.update(task, completed=done, total=total)

            report = evaluate.run(engine, ref, text, prompt_set, window, max_tokens, gen_tokens, track)
    except USER_ERRORS as e:
        fail(e)
    Console().print(_eval_table(report))
    write_output(json_out, json.dumps(report, indent=1, ensure_ascii=False))


def _eval_table(r: dict):
    """The report as a two-column table: what was measured, and the number."""
    from rich.table import Table

    def describe(m: dict) -> str:
        return f"{m['model']} ({m['bits']}-bit, K={m['k']})"

    def share(valid: int, total: int) -> str:
        return f"{valid}/{total} ({valid / total:.0%})" if total else "-"

    table = Table("measure", "value", title="flashmoe eval", title_justify="left")
    table.add_row("model", describe(r))
    table.add_row("tokens scored", f"{r['tokens']:,} in {r['windows']} windows of up to {r['window']}")
    table.add_row("perplexity", f"{r['ppl']:.4g} (NLL {r['nll']:.4f} nats/token)")
    if "reference" in r:
        table.add_row("reference", f"{describe(r['reference'])}, perplexity {r['reference']['ppl']:.4g}")
        table.add_row("KL(reference || model)", f"{r['kl']:.3g} nats/token")
        table.add_row("top-1 agreement", f"{r['top1']:.2%}")
    for key, label in (("tool", "tool calls valid"), ("json", "JSON answers valid")):
        if any(v[f"{key}_total"] for v in r["validity"].values()):
            table.add_row(label, ", ".join(
                f"{mode} {share(v[f'{key}_valid'], v[f'{key}_total'])}" for mode, v in r["validity"].items()
            ))
    table.add_row("seconds", ", ".join(f"{name.replace('_', ' ')} {s:.1f}" for name, s in r["seconds"].items()))
    return table


app.command("chat")(chat_command)
app.command("serve")(serve_command)


def main() -> None:
    app()
