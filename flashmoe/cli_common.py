"""What the commands that load a model share: their options, error reporting, reading the prompt and
writing report files, opening the Engine, and sampling parameters with the model's own defaults."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .utils import atomic_write_text, parse_size, read_json

err = Console(stderr=True, highlight=False)
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def fail(e: BaseException) -> None:
    """Report a user error on one line and exit 2. The message is escaped: it may quote a path or a
    value the user typed, and a "[/x]" in it is text, not markup."""
    err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
    raise typer.Exit(2)


def _check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        fail(ValueError(f"--port {port} is not a TCP port: choose one from 1 to 65535"))
    return port


def prompt_text(prompt: str) -> str:
    """The prompt a user gave (`-` reads stdin), refused unless it is UTF-8 text: stray bytes would
    reach the tokenizer as unpaired surrogates."""
    data, source = (sys.stdin.buffer.read(), "on stdin") if prompt == "-" else (os.fsencode(prompt), "given")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"the prompt {source} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): convert it to UTF-8"
        ) from None


def write_output(path: Optional[Path], text: str) -> None:
    """Write a command's report file (whole or not at all), after the report was shown: a failed write
    then loses nothing the run computed."""
    if path is None:
        return
    try:
        atomic_write_text(path, text)
    except OSError as e:
        fail(e)


def check_output_path(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work that fills it starts."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: name a file to write")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {path.parent} does not exist; create it first")


# The engine's options (flashmoe/config.py EngineConfig): one definition and help text each, added
# to every command that loads a model by `engine_options`, shown in their own help panel.
def _engine_option(name: str, annotation, default, *decls: str, help: str) -> inspect.Parameter:
    option = typer.Option(default, *decls, help=help, rich_help_panel="Engine")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


ENGINE_OPTIONS = [
    _engine_option("device", str, "auto", "--device",
                   help="auto (the GPU where PyTorch sees one and the model runs there, else the CPU), cpu, cuda or cuda:N."),
    _engine_option("dtype", str, "auto", "--dtype", help="Compute dtype: auto (bfloat16 on GPUs, float32 on the CPU, where "
                   "the projections keep their 16-bit values), bfloat16, float16, float32."),
    _engine_option("host_mem", Optional[str], None, "--host-mem",
                   help="Expert cache budget in RAM, e.g. 2G (default: half the free RAM)."),
    _engine_option("ngram_mem", Optional[str], None, "--ngram-mem",
                   help="Of the host budget, RAM for cached n-gram table rows (qwen4_exp), e.g. 1G (default: a sixteenth)."),
    _engine_option("gpu_mem", Optional[str], None, "--gpu-mem",
                   help="With --device cuda: GPU memory for cached experts (default: free memory minus a margin)."),
    _engine_option("k", Optional[int], None, "--k", help="Experts per token (default: the model's own)."),
    _engine_option("cache_policy", str, "mix", "--cache-policy",
                   help="Which experts the caches keep: mix (count x 10 + recency), lru, lfu or static. With --preload, "
                   "all but static move the most used experts onto the GPU as decode runs."),
    _engine_option("dense_bits", int, 16, "--dense-bits",
                   help="Resident dense weights: 16, or 8 (attention/DeltaNet projections, shared experts and lm_head "
                   "as int8 quantized at load: half the memory, half the bytes per decoded token; on the CPU slower than 16)."),
    _engine_option("prefetch", bool, False, "--prefetch",
                   help="With --device cuda: guess each layer's experts one layer ahead and start copying them early."),
    _engine_option("cpu_experts", int, 0, "--cpu-experts",
                   help="With --device cuda: compute up to N of each decode layer's RAM-resident experts on the CPU "
                   "(needs numba). With --preload, server threads on all cores but one take a share of those the GPU "
                   "would read over PCIe; without, misses the CPU computes are not copied."),
    _engine_option("preload", Optional[bool], None, "--preload/--no-preload",
                   help="On the GPU: read every expert into GPU or host memory at start, then read each where it lies: "
                   "no copies and no host sync per layer, one CUDA graph per token (default: when the GPU and host "
                   "budgets hold every expert and --prefetch is off; --no-preload streams them)."),
    _engine_option("placement_heat", bool, True, "--placement-heat/--no-placement-heat",
                   help="With preloaded experts: start each layer's GPU slots with the experts the last run found "
                   "hottest (placement_heat.safetensors beside the model), and save what this run learns at exit."),
    _engine_option("verify", bool, True, "--verify/--no-verify",
                   help="Check each expert record's CRC32 the first time it is read."),
    _engine_option("profile", bool, False, "--profile",
                   help="With --device cuda: synchronize at each timed section so the breakdown is exact (slower)."),
    _engine_option("threads", Optional[int], None, "--threads",
                   help="CPU compute threads (default: the cores other processes leave free, measured as it runs)."),
]


def engine_options(**defaults: Any) -> Callable:
    """Give a command the engine's options (ENGINE_OPTIONS, some defaults replaced); it receives
    them checked, as `config: EngineConfig` (a bad value is a one-line error before anything loads)."""
    options = [p.replace(default=typer.Option(defaults[p.name], *p.default.param_decls, help=p.default.help,
                                              rich_help_panel="Engine")) if p.name in defaults else p
               for p in ENGINE_OPTIONS]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "config"]

        @functools.wraps(command)
        def with_engine_options(**values: Any) -> Any:
            try:
                config = engine_config(**{p.name: values.pop(p.name) for p in options})
            except ValueError as e:
                fail(e)
            return command(config=config, **values)

        with_engine_options.__signature__ = signature.replace(parameters=own + options)
        return with_engine_options

    return decorate


def engine_config(host_mem: str | None = None, gpu_mem: str | None = None, ngram_mem: str | None = None, **values: Any):
    """EngineConfig from command-line values (sizes as text: "" is an error, not the default)."""
    from .config import EngineConfig

    sizes = {name: None if text is None else parse_size(text)
             for name, text in (("host_mem", host_mem), ("gpu_mem", gpu_mem), ("ngram_mem", ngram_mem))}
    return EngineConfig(**sizes, **values)


TEMPERATURE_OPTION = typer.Option(None, help="0 = greedy. Default: generation_config.json, else 0.")
TOP_P_OPTION = typer.Option(None, "--top-p", help="Nucleus sampling mass.")
TOP_K_OPTION = typer.Option(None, "--top-k", help="Sample among the k most likely tokens (0 = off).")
SEED_OPTION = typer.Option(None, help="Random seed for sampling.")
# For `serve`: refused while the command line is read, before a model loads.
PORT_OPTION = typer.Option(8000, "--port", callback=_check_port, help="TCP port (1-65535).")


def sampling_params(model: Path, temperature=None, top_p=None, top_k=None, **fields):
    """SamplingParams with the model's recommended sampling where the user set none."""
    from .runtime.sampling import SamplingParams

    d = sampling_defaults(model)
    return SamplingParams(
        temperature=d["temperature"] if temperature is None else temperature,
        top_p=d["top_p"] if top_p is None else top_p,
        top_k=d["top_k"] if top_k is None else top_k,
        **fields,
    )


def sampling_defaults(model: Path) -> dict:
    """The model's recommended sampling (generation_config.json), or greedy."""
    from .runtime.sampling import SamplingParams

    path, fix = model / "generation_config.json", "; correct generation_config.json or delete it"
    gen = read_json(path, fix=fix) if path.exists() else {}
    if not isinstance(gen, dict):
        raise ValueError(f"{path} must hold a JSON object{fix}")
    if not gen.get("do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    defaults = {"temperature": gen.get("temperature", 1.0), "top_p": gen.get("top_p", 1.0), "top_k": gen.get("top_k", 0)}
    try:
        SamplingParams(**defaults)  # a bad value is the file's fault: say so now, not as if the user had typed it
    except ValueError as e:
        raise ValueError(f"{path}: {e}{fix}") from None
    return defaults


def open_engine(model: Path, config):
    """The Engine of `model` under `config` (an EngineConfig), with a progress bar while --preload
    reads; one line on stderr says what it chose (device, dtype, expert cache) and why."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from .engine import Engine

    columns = (TextColumn("preloading experts"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=err, transient=True)
    task = None

    def progress(done: int, total: int) -> None:  # shown once a preload (asked for or chosen) starts reading
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("preload", total=total)
        bar.update(task, completed=done, total=total)

    try:
        engine = Engine(model, config, progress=progress)
    finally:
        bar.stop()
    err.print(f"[dim]running on {escape(', '.join(engine.choices))}[/]", highlight=False, soft_wrap=True)
    return engine
