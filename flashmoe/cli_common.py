"""What the commands that load a model share: their options, error reporting, reading the prompt and
writing report files, opening the Engine, and sampling parameters with the model's own defaults."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

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


# Options shared by every command that loads a model (one definition, one help text).
K_OPTION = typer.Option(None, "--k", help="Experts per token (default: the model's own).")
HOST_MEM_OPTION = typer.Option(None, "--host-mem", help="Expert cache budget in RAM, e.g. 2G (default: half the free RAM).")
DEVICE_OPTION = typer.Option("cpu", help="cpu or cuda.")
GPU_MEM_OPTION = typer.Option(
    None, "--gpu-mem", help="With --device cuda: GPU memory for cached experts (default: free memory minus a margin)."
)
CACHE_POLICY_OPTION = typer.Option(
    "mix", "--cache-policy",
    help="Which experts the caches keep: mix (count x 10 + recency), lru, lfu or static. With --preload, all but "
    "static move the most used experts onto the GPU as decode runs.",
)
DTYPE_OPTION = typer.Option(
    "auto", help="Compute dtype: auto (bfloat16 on GPUs and CPUs with native bf16, else float32), bfloat16, float16, float32."
)
DENSE_BITS_OPTION = typer.Option(
    16, "--dense-bits",
    help="Resident dense weights: 16, or 8 (attention/DeltaNet projections, shared experts and lm_head as int8 "
    "quantized at load: half the memory, half the bytes per decoded token; on the CPU slower than 16).",
)
VERIFY_OPTION = typer.Option(True, help="Check each expert record's CRC32 the first time it is read.")
PREFETCH_OPTION = typer.Option(
    False, "--prefetch", help="With --device cuda: guess each layer's experts one layer ahead and start copying them early."
)
CPU_EXPERTS_OPTION = typer.Option(
    0, "--cpu-experts",
    help="With --device cuda: compute up to N of each decode layer's RAM-resident experts on the CPU (needs numba). "
    "With --preload, server threads on all cores but one take a share of those the GPU would read over PCIe "
    "(faster on an H200: docs/EXPERIMENTS.md entry 39); without, misses the CPU computes are not copied (slower there, entry 26).",
)
PRELOAD_OPTION = typer.Option(
    False, "--preload",
    help="With --device cuda: read every expert into GPU or host memory at start (they must hold the model), then "
    "read each where it lies: no copies and no host sync per layer, one CUDA graph per decoded token.",
)
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


DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def open_engine(
    model: Path,
    device: str = "cpu",
    host_mem: Optional[str] = None,
    k: Optional[int] = None,
    verify: bool = True,
    dtype: str = "auto",
    gpu_mem: Optional[str] = None,
    **extra,
):
    """The Engine from command-line values (sizes as text, dtype by name)."""
    import torch

    from .engine import Engine

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N (a GPU's index), not {device!r}")
    preload = extra.pop("preload", False)
    flags = (("--prefetch", extra.get("prefetch")), ("--cpu-experts", extra.get("cpu_experts")), ("--preload", preload))
    gpu_only = [flag for flag, on in flags if on]
    if device == "cpu" and gpu_only:
        raise ValueError(
            f"{gpu_only[0]} is for the GPU path (--device cuda): it arranges host-to-GPU traffic. On the CPU every "
            "expert is computed from RAM already (with numba installed, straight from the packed records); drop it"
        )
    engine = Engine(
        model,
        device=device,
        dtype=getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None,
        host_mem=None if host_mem is None else parse_size(host_mem),  # "" is an error, not the default
        gpu_mem=None if gpu_mem is None else parse_size(gpu_mem),
        top_k=k,
        verify=verify,
        **extra,
    )
    try:  # here, not in Engine: bench's synthesized models pair the Qwen3.5 tokenizer with smaller vocabularies
        engine.config.check_tokenizer(engine.tokenizer.vocab_size, model / "tokenizer.json")
    except ValueError:
        engine.close()
        raise
    if preload:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        columns = (TextColumn("preloading experts"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("preload", total=engine.manifest.total_expert_bytes)
            engine.preload(progress=lambda n: bar.advance(task, n))
    return engine


