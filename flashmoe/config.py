"""EngineConfig: every option of a loaded model's engine and the rules between them, checked in one
place. The CLI, chat, server and eval build it from one option set (cli_common.engine_options);
the Engine takes it whole. What depends on the model (k within its experts, a budget that holds a
token's experts) is checked when the model loads."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CACHE_POLICIES = ("mix", "lru", "lfu", "static")


def default_ngram_mem(table_bytes: int, host_budget: int) -> int:
    """The n-gram row cache without --ngram-mem: a sixteenth of the host budget, at most the tables'
    rows (table_bytes); the experts' cache keeps the rest."""
    return min(table_bytes, host_budget // 16)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto: the GPU where there is one and the model runs there (Engine decides)
    dtype: str = "auto"  # auto: bfloat16 on GPUs, float32 on the CPU
    host_mem: int | None = None  # bytes of RAM for the expert cache; None: half the free RAM
    # bytes of the host budget for the n-gram row cache (qwen4_exp); None: default_ngram_mem
    ngram_mem: int | None = None
    gpu_mem: int | None = None  # bytes of GPU memory for cached experts; None: what is free minus a margin
    k: int | None = None  # routed experts per token; None: the model's own
    cache_policy: str = "mix"
    dense_bits: int = 16  # 16, or 8: the large dense projections as int8 (layers/int8_linear.py)
    prefetch: bool = False  # GPU: guess each layer's experts one layer ahead and copy them early
    cpu_experts: int = 0  # GPU: up to this many of a layer's host-resident experts computed on the CPU
    # GPU: every expert in GPU or host memory, read where it lies; None (auto): when the two tiers'
    # budgets hold every expert and --prefetch is off (Engine decides), else streamed
    preload: bool | None = None
    # GPU, preloaded: start from the placement heat saved beside the model, and save it at close
    placement_heat: bool = True
    verify: bool = True  # CRC32 of each expert record on its first read
    profile: bool = False  # GPU: synchronize at every timed section (exact breakdown, slower)
    # CPU compute threads; None: the cores other processes leave free (runtime/threads.py). PyTorch's
    # sums round differently with another count: fix it for results reproducible to the last bit.
    threads: int | None = None
    io_threads: int = 8
    prefill_chunk: int = 2048
    direct_io: bool = False  # read expert records with O_DIRECT, past the page cache
    cuda_graphs: bool = True
    # GPU, with CUDA graphs: sequences whose states are allocated once (layers/state.StatePool), so a
    # batch's decode graph is recorded per bucket of slots and replayed as sequences come and go
    # (serve sets it to --parallel); 0: none, a batch decodes eagerly
    decode_slots: int = 0
    # The GPU path's logic (GPU tier, Triton kernels) on a CPU device, for tests: the kernels run in
    # Triton's interpreter. A GPU device takes that path anyway.
    gpu_path_on_cpu: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (a GPU's index), not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(f"--cache-policy must be one of {', '.join(CACHE_POLICIES)}, not {self.cache_policy!r}")
        if self.dense_bits not in (16, 8):
            raise ValueError(f"--dense-bits must be 16 or 8, got {self.dense_bits}")
        for flag, value in (("--host-mem", self.host_mem), ("--gpu-mem", self.gpu_mem), ("--ngram-mem", self.ngram_mem)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be a size of at least 0, got {value}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"--k must be at least 1 (the experts each token is routed to), got {self.k}")
        if self.cpu_experts < 0:
            raise ValueError(f"--cpu-experts must be >= 0, got {self.cpu_experts}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.decode_slots < 0:
            raise ValueError(f"decode_slots must be 0 or more, not {self.decode_slots}")
        if self.io_threads < 1 or self.prefill_chunk < 1:
            raise ValueError("io_threads and prefill_chunk must be at least 1")
        gpu_only = [flag for flag, on in (("--prefetch", self.prefetch), ("--cpu-experts", self.cpu_experts),
                                          ("--preload", self.preload is True), ("--gpu-mem", self.gpu_mem is not None)) if on]
        if not self.gpu_path and gpu_only and self.device != "auto":  # auto: checked again once decided
            raise ValueError(
                f"{gpu_only[0]} is for the GPU path (--device cuda): it arranges host-to-GPU traffic. On the CPU every "
                "expert is computed from RAM already (with numba installed, straight from the packed records); drop it"
            )
        if self.prefetch and self.preload is True:
            raise ValueError("--prefetch and --preload exclude each other: preloaded experts are read in place, never copied")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def gpu_path(self) -> bool:
        """Whether routed experts go through the GPU tier and the Triton kernels."""
        return self.on_gpu or self.gpu_path_on_cpu

    def torch_dtype(self) -> tuple[torch.dtype, str]:
        """The compute dtype and why: the named one, or for auto bfloat16 on GPUs and float32 on the
        CPU (its one-token step kernels are fp32, and bf16 decoded slower there and left
        transformers' greedy path: EXPERIMENTS entry 74; the projections keep their 16-bit values
        all the same, layers/int8_linear.Bf16Linear)."""
        chosen = DTYPES[self.dtype]
        if chosen is not None:
            return chosen, "--dtype"
        return (torch.bfloat16, "the GPU's default") if self.on_gpu else (torch.float32, "the CPU's default")

    def but(self, **changes) -> "EngineConfig":
        """A copy with some options changed (and checked again)."""
        return replace(self, **changes)
