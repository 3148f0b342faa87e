"""The Engine: one loaded model, configured by one EngineConfig. Dense weights resident on the
device, experts behind the store (and on the GPU path the GPU tier); `forward` runs ids through the
model, `generate` (flashmoe/generation.py) the sampling loop. The CLI, chat, server and eval are
thin layers over it."""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .config import EngineConfig, default_ngram_mem
from .formats.packed import Manifest
from .formats.safetensors import SafetensorsFile
from .generation import ContextLengthError, Generation, LogitsProcessor
from . import kernels
from .layers.int8_linear import use_bf16_linears, use_int8_linears
from .layers.ple import table_rows
from .layers.state import SequenceState, StatePool
from .models import read_args
from .models.context import StepContext
from .models.transformer import Model
from .moe.block import FP32_TENSORS, MoEBlock, RoutedExperts
from .quant import quantize_int8_rows
from .experts.heat import hottest_first, read_heat, write_heat
from .experts.streamed import StreamedExperts
from .experts.store import BudgetError, ExpertStore, StoreStats
from .runtime.graphs import GRAPH_MAX_TOKENS
from .runtime.ngram_rows import NgramRowStore, NgramStats
from .runtime.sampling import SamplingParams
from .runtime.stats import GpuTierStats, Timer
from .runtime.threads import ThreadBudget
from .tokenizer import Tokenizer
from .utils import available_memory_bytes, format_bytes

__all__ = ["ContextLengthError", "Engine", "EngineConfig", "GpuMemoryError"]

POOL_CAPACITY = 1024  # positions each StatePool slot holds at first (a slot whose sequence needs more grows alone)


class GpuMemoryError(RuntimeError):
    """The GPU ran out of memory; the message names the budget to lower."""


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None,
                 progress: Callable[[int, int], None] | None = None):
        """Load a packed model: dense weights resident on the config's device, experts behind the
        caches (docs/FORMAT.md; flashmoe/config.py says what each option does). `progress(done,
        total)` hears of the bytes of expert records read while loading (--preload)."""
        config = config or EngineConfig()
        self.dir = Path(model_dir)
        self.manifest = Manifest.load(self.dir)
        self.args = read_args(self.dir)
        moe = self.args.moe
        self.manifest.check(self.args.hidden_size, moe.intermediate, moe.num_experts, self.args.moe_layers, moe.expert_bias)
        self.config = config = self._decide_device(config)
        self.tokenizer = Tokenizer.from_dir(self.dir)
        self.args.check_tokenizer(self.tokenizer.vocab_size, self.dir / "tokenizer.json")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu")
        self.dtype, why_dtype = config.torch_dtype()
        self.choices.append(f"{str(self.dtype).removeprefix('torch.')} ({why_dtype})")
        self.top_k = moe.top_k if config.k is None else config.k
        if not 1 <= self.top_k <= moe.num_experts:
            raise ValueError(f"--k must be between 1 and {moe.num_experts} (the model has {moe.num_experts} experts)")
        self.timer = Timer(sync=torch.cuda.synchronize if self.device.type == "cuda" and config.profile else None)
        self.model = self._load_dense()
        self.cuda_graphs = config.cuda_graphs and self.device.type == "cuda"
        if self.cuda_graphs and (obstacle := self.model.graph_obstacle()):
            self.cuda_graphs = False
            self.choices.append(f"eager decode, no CUDA graphs ({obstacle})")
        # layers/state.StatePool, and its decode graphs by bucket of slots: batches decode through
        # them (forward_batch); without a pool a batch runs eagerly
        self.pool = None
        self._pool_graphs: dict = {}
        if self.cuda_graphs and config.decode_slots:
            self.pool = StatePool(lambda: self.model.new_state(self.dtype, self.device), config.decode_slots, POOL_CAPACITY)
        self.moe_layers = self.args.moe_layers
        every_expert = ExpertStore.keeping_every_record(self.manifest, self.top_k)
        budget = config.host_mem if config.host_mem is not None else min(
            every_expert + self.manifest.total_ngram_bytes, available_memory_bytes() // 2)
        budget -= self._open_ngram_tables(budget)
        self.choices.append(f"experts cached in {format_bytes(budget)} of RAM ("
                            + ("--host-mem" if config.host_mem is not None else "all of them" if budget >= every_expert
                               else "half the free RAM") + ")")
        self.store = ExpertStore(self.dir, self.manifest, budget, self.top_k, config.io_threads, config.verify,
                                 self.device.type == "cuda", config.direct_io, config.cache_policy)
        self.gpu_tier = None
        self.cpu_experts, self._host_compute = config.cpu_experts, None
        self.guesses: dict[int, Callable] = {}  # prefetch: layer -> the next MoE layer's guessed ids
        # CPU path: decode tokens' experts through the numba kernel, on the cores other processes leave.
        self.cpu_kernel = None if config.gpu_path else self._cpu_kernel()
        self.threads = None if config.gpu_path else ThreadBudget(self._set_threads, config.threads)
        self.experts: list[RoutedExperts | None] = [None] * self.args.num_hidden_layers
        for i in self.moe_layers:
            self.experts[i] = StreamedExperts(self.store, i, self.timer, self.cpu_kernel, moe.act)
        self.moe_steps = self._cpu_moe_steps()
        self.cpu_decode = self._cpu_decode_step()
        self.set_top_k(self.top_k)
        if config.gpu_path:
            self.use_gpu_experts(config.gpu_mem, config.cache_policy)
            if self._decide_preload():
                total = self.manifest.total_expert_bytes
                done = [0]

                def advance(n: int) -> None:
                    done[0] += n
                    progress(done[0], total)

                self.preload(progress=advance if progress else None)
        self.stop_ids = set(self.args.eos_token_ids) | {
            i for t in ("<|im_end|>", "<|endoftext|>") if (i := self.tokenizer.token_to_id(t)) is not None
        }

    # -- loading ---------------------------------------------------------------------------------
    def _decide_device(self, config: EngineConfig) -> EngineConfig:
        """`config` with --device auto decided (a GPU where PyTorch sees one: every family runs on the
        GPU path), and the choice with its reason in `choices`, the line the CLI prints."""
        if config.device != "auto":
            self.choices = [f"{config.device} (--device)"]
            return config
        if not torch.cuda.is_available():
            device, why = "cpu", "no CUDA GPU"
        else:
            device, why = "cuda", torch.cuda.get_device_name()
        self.choices = [f"{device} (auto: {why})"]
        return config.but(device=device)  # checked again: a GPU-only option on a CPU-only machine fails here

    def _load_dense(self) -> Model:
        with torch.device("meta"):
            model = Model(self.args)
        int8 = set(use_int8_linears(model)) if self.config.dense_bits == 8 else set()
        # fp32 on the CPU: the projections and the embedding table keep the file's bf16 values (exact,
        # half the bytes a decode step reads and half the RAM), computed in fp32
        # (layers/int8_linear.Bf16Linear, Bf16Embedding).
        stored16 = (self.device.type == "cpu" and self.dtype == torch.float32 and self.manifest.dense_dtype == "bfloat16"
                    and kernels.use_cpu_kernels(torch.empty(0)))
        bf16 = set(use_bf16_linears(model)) if stored16 else set()
        weights = {}
        with SafetensorsFile(self.dir / self.manifest.dense_file) as f:
            for name in f.tensors:
                module, _, kind = name.rpartition(".")
                if module in int8 and kind == "weight":  # quantized from the stored 16-bit values, on the device
                    weights[name], weights[f"{module}.scale"] = quantize_int8_rows(f.read(name).to(self.device))
                elif module in bf16 and kind == "weight":
                    weights[name] = f.read(name)
                else:
                    dtype = torch.float32 if kind in FP32_TENSORS else self.dtype
                    weights[name] = f.read(name).to(self.device, dtype)
        model.load_state_dict(weights, strict=True, assign=True)
        del weights  # the model's references are the only ones now: fusing frees each weight it copies
        model.fuse_projections()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the copies fusing freed: the GPU tier is sized by what the driver reports free
        return model.eval()

    def _open_ngram_tables(self, host_budget: int) -> int:
        """Attach the n-gram tables' files (families with per-layer embeddings) behind a row cache
        taken from the host budget (--ngram-mem, or a sixteenth of it, at most the tables); -> its bytes."""
        tables = {i: (table_rows(ple.spec), ple.spec.width) for i, ple in self.model.ngram_layers.items()}
        self.manifest.check_ngrams(tables)
        ngram_mem = self.config.ngram_mem
        budget = default_ngram_mem(self.manifest.total_ngram_bytes, host_budget) if ngram_mem is None else ngram_mem
        self.ngram_rows = NgramRowStore(self.dir, self.manifest.ngram_files, budget, self.device, self.config.io_threads,
                                        self.config.verify, self.config.direct_io)
        if tables:
            self.model.attach_ngram_tables(self.ngram_rows.fetch)
            self.choices.append(f"n-gram rows cached in {format_bytes(self.ngram_rows.cached_bytes)} of RAM ("
                                + ("--ngram-mem" if ngram_mem is not None else "a sixteenth of the host budget"
                                   if budget < self.manifest.total_ngram_bytes else "all of them") + ")")
        return self.ngram_rows.cached_bytes

    def _cpu_kernel(self, threads: int | None = None, required: bool = False):
        """The numba kernel that computes routed experts from their packed records on the CPU
        (kernels/cpu_experts.py), compiled on first use (seconds, cached on disk after). Where numba
        is missing or the records are 16-bit: None, or with `required` an error saying why."""
        from .kernels.cpu_experts import CpuExperts, cpu_experts_available

        if not cpu_experts_available():
            if required:
                raise RuntimeError("--cpu-experts needs numba: pip install 'flashmoe[cpu-experts]'")
            return None
        if not CpuExperts.supports(self.manifest.layout):
            if required:
                raise ValueError(f"--cpu-experts computes quantized experts only, not {self.manifest.layout.bits}-bit records")
            return None
        kernel = CpuExperts(self.manifest.layout, threads, self.args.moe.act)
        kernel.warmup()
        return kernel

    def _cpu_moe_steps(self) -> list:
        """Per layer, the CPU path's MoE half of a decode step in one call where the kernel covers
        the layer (experts/cpu_moe_step.py), else None; [] without the expert kernel (the GPU path,
        no numba, 16-bit records) or where the model computes in 16 bits."""
        if self.cpu_kernel is None or self.dtype != torch.float32:
            return []
        from .experts.cpu_moe_step import CpuMoEStep

        layers = self.model.layers
        return [CpuMoEStep(layers[i], self.experts[i])
                if i in self.moe_layers and CpuMoEStep.obstacle(layers[i]) is None else None for i in range(len(layers))]

    def _cpu_decode_step(self):
        """The CPU path's decode step (a token per sequence) in one loop over the layers' kernels
        (runtime/cpu_decode.py) where every layer has them, else None; it runs while `moe_steps`
        holds them (emptied by the GPU path and by wrapped routed experts)."""
        from .runtime.cpu_decode import CpuDecodeStep

        return None if CpuDecodeStep.obstacle(self.model, self.moe_steps) else CpuDecodeStep(self.model, self.moe_steps, self.timer)

    def _set_threads(self, n: int) -> None:
        """Compute on the CPU with n threads: PyTorch's pool and the expert kernel's."""
        torch.set_num_threads(n)
        if self.cpu_kernel is not None:
            self.cpu_kernel.threads = n

    # -- routing ---------------------------------------------------------------------------------
    def set_top_k(self, k: int) -> None:
        """Route each token to k experts from now on (at most the k the engine was loaded with)."""
        if not 1 <= k <= self.store.batch:
            raise ValueError(f"k must be between 1 and {self.store.batch}")
        self.top_k = k
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.top_k = k

    # -- the GPU path ----------------------------------------------------------------------------
    def use_gpu_experts(self, gpu_mem: int | None, policy: str = "mix") -> None:
        """Route the experts through a tier of GPU slots and the Triton kernels (Triton is only
        imported here: the CPU path needs none of it)."""
        from .kernels.moe_gemv import MoeGemv
        from .kernels.moe_grouped import MoeGrouped
        from .experts.gpu_routed import DECODE_MAX_TOKENS, GpuRoutedExperts
        from .experts.tier import GpuExpertTier

        self.moe_steps = []  # the CPU path's (and its one-loop decode's): its experts come from the store
        layout = self.manifest.layout
        staging = min(self.args.moe.num_experts, DECODE_MAX_TOKENS * self.top_k)
        prefetch = self.top_k if self.config.prefetch else 0  # slots per region (two regions)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        else:  # the GPU path's logic on the CPU, for tests (kernels in Triton's interpreter)
            free, total = available_memory_bytes(), available_memory_bytes()
        margin = max(2 << 30, total // 12) if self.device.type == "cuda" else 0  # states, activations
        available = free - margin - (staging + 2 * prefetch) * layout.record_size
        if gpu_mem is None:
            gpu_mem = max(0, available)
        elif gpu_mem > available:
            raise ValueError(
                f"--gpu-mem {format_bytes(gpu_mem)} is more than the GPU has free for experts "
                f"({format_bytes(max(0, available))} after dense weights and a {format_bytes(margin)} margin); lower it"
            )
        capacity = min(gpu_mem // layout.record_size, self.manifest.total_expert_bytes // layout.record_size)
        try:
            self.gpu_tier = GpuExpertTier(layout, capacity, staging, self.device, policy, prefetch, self.store.pool)
        except torch.cuda.OutOfMemoryError:
            slots = capacity + staging + 2 * prefetch
            raise GpuMemoryError(
                f"the GPU ran out of memory allocating {slots} expert slots "
                f"({format_bytes(slots * layout.record_size)}): lower --gpu-mem"
            ) from None
        if layout.scheme == "mxfp4":  # gpt-oss as released
            from .kernels.moe_mxfp4 import MoeMxfp4

            mxfp4 = MoeMxfp4(layout, self.args.moe.act)
            gemv, grouped = mxfp4, mxfp4.grouped
        else:
            act = self.args.moe.act
            gemv, grouped = MoeGemv(layout, act=act), MoeGrouped(layout, act=act)
        moe = self.moe_layers
        for i, nxt in zip(moe, moe[1:] + [None]):
            self.experts[i] = GpuRoutedExperts(self.gpu_tier, self.store, i, gemv, grouped, self.timer, nxt)
        self.set_prefetch(self.config.prefetch)
        self.set_cpu_experts(self.config.cpu_experts)

    def set_prefetch(self, on: bool) -> None:
        """Guess each MoE layer's experts one layer ahead during decode (or stop). The guess runs in
        the previous MoE layer's dense part (captured in its CUDA graph), so one host sync per layer
        still reads the routing; needs the GPU path loaded with prefetch (its prefetch slots)."""
        from .experts.gpu_routed import NextLayerGuess

        if on and self.args.hyper_connections() is not None:
            raise ValueError(f"--prefetch guesses a layer's experts through its post-attention norm, which "
                             f"{self.args.model_type}'s hyper-connections replace: drop --prefetch")
        if on and not (self.gpu_tier is not None and self.gpu_tier.prefetch_slots):
            raise ValueError("prefetch needs the GPU expert path, loaded with prefetch=True")
        if on and self.resident:
            raise ValueError("--prefetch and --preload exclude each other: preloaded experts are read in place, never copied")
        moe = self.moe_layers
        self.guesses = {i: NextLayerGuess(self.model.layers[nxt]) for i, nxt in zip(moe, moe[1:])} if on else {}

    def set_cpu_experts(self, per_layer: int) -> None:
        """Compute up to `per_layer` host-resident experts of each decode layer on the CPU (0: none):
        misses, which the copying path then does not copy (HostCompute), or with resident experts
        (preload) a share of those read over PCIe (ResidentCpuShare: server threads on all cores
        but one). The kernels are compiled on first use (seconds; cached on disk after)."""
        if per_layer < 0:
            raise ValueError(f"--cpu-experts must be >= 0, got {per_layer}")
        if per_layer and self.gpu_tier is None:
            raise ValueError("--cpu-experts needs the GPU expert path (--device cuda): on the CPU path every expert is computed there")
        self.cpu_experts = per_layer
        self._attach_cpu_share()

    def _attach_cpu_share(self) -> None:
        """Give the GPU tier the CPU's share that --cpu-experts and the placement call for."""
        from .experts.cpu_share import HostCompute, ResidentCpuShare

        tier, n = self.gpu_tier, self.cpu_experts
        if tier is None:
            return
        tier.host_compute = None
        if self.resident:
            if n and tier.cpu_share is not None and tier.cpu_share.handoff.max_cpu == n:
                return
            tier.set_cpu_share(ResidentCpuShare(tier, self.store, n, self.top_k, self.args.moe.act) if n else None)
            if n:
                self._say_split(tier.cpu_share.split)
            return
        if n:
            if self._host_compute is None:
                self.cpu_kernel = self.cpu_kernel or self._cpu_kernel(required=True)  # default threads: all cores but one
                self._host_compute = HostCompute(self.cpu_kernel, self.store, self.top_k, self.dtype, self.device, n)
                self._say_split(self._host_compute.split)
            self._host_compute.per_layer = n
            tier.host_compute = self._host_compute

    @property
    def cpu_split(self):
        """The CPU's share's split in use (experts/cpu_share.Split), or None without one."""
        tier = self.gpu_tier
        if tier is None or not self.cpu_experts:
            return None
        share = tier.cpu_share if self.resident else tier.host_compute
        return share.split if share is not None else None

    def _say_split(self, split) -> None:
        self.choices = [c for c in self.choices if not c.startswith("CPU share")] + [split.describe(self.manifest.layout.record_size)]

    @property
    def resident(self) -> bool:
        """Whether every expert is read where it lies in the GPU or host tier (preload)."""
        return self.gpu_tier is not None and self.gpu_tier.resident is not None

    def place_experts(self, gpu_per_layer: int, host_per_layer: int, progress: Callable[[int], None] | None = None,
                      heat: np.ndarray | None = None) -> None:
        """Read g = gpu_per_layer experts of each MoE layer into GPU slots and the next h into the
        host tier (`progress(bytes)` after each batch of reads): experts [0, g) and [g, g + h), or
        with `heat` [layers, experts] each layer's hottest first. Experts an earlier placement left
        in the other tier (adaptive placement moves them) trade places first, without reading the disk."""
        E, rs, batch = self.args.moe.num_experts, self.manifest.layout.record_size, self.store.batch
        order = {layer: hottest_first(heat, layer, E) for layer in self.moe_layers}
        on_gpu = {layer: set(order[layer][:gpu_per_layer]) for layer in self.moe_layers}
        tier, misplaced = self.gpu_tier, defaultdict(list)
        for layer, e in list(tier.slots.slot_of):
            if e not in on_gpu[layer]:
                misplaced[layer].append(e)
        for layer, to_host in misplaced.items():
            to_gpu = [e for e in order[layer][:gpu_per_layer] if (layer, e) in self.store.slots and (layer, e) not in tier.slots]
            for up, down in zip(to_gpu, to_host):
                tier.swap(self.store, layer, up, down)
        if misplaced and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the CPU reads host records unordered with the stream's copies
        for layer in self.moe_layers:
            host = order[layer][gpu_per_layer : gpu_per_layer + host_per_layer]
            for start in range(0, len(host), batch):
                for _ in self.store.load(layer, host[start : start + batch]):
                    pass
                if progress:
                    progress(len(host[start : start + batch]) * rs)
        for layer in self.moe_layers:
            experts = order[layer][:gpu_per_layer]
            self.gpu_tier.preload(layer, experts, self.store)
            if progress:
                progress(len(experts) * rs)
        self.store.stats = StoreStats()

    def _decide_preload(self) -> bool:
        """Whether to preload (the GPU path): --preload / --no-preload, or auto: when the GPU and
        host tiers' budgets hold every expert and --prefetch is off (read in place, nothing is copied
        per token: the fastest placement there is); the choice joins `choices`."""
        if self.config.preload is not None:
            if self.config.preload:
                self.choices.append("experts preloaded (--preload)")
            return self.config.preload
        if self.config.prefetch:
            self.choices.append("experts streamed (--prefetch)")
            return False
        g, host_needed, short = self._preload_split()
        rs = self.manifest.layout.record_size
        if short:
            self.choices.append(f"experts streamed (auto: GPU and host budgets are {format_bytes(short * rs)} short of "
                                "holding them all)")
            return False
        self.choices.append(f"experts preloaded (auto: {format_bytes(len(self.moe_layers) * g * rs)} on the GPU, "
                            f"{format_bytes(host_needed * rs)} in RAM)")
        return True

    def _preload_split(self, gpu_per_layer: int | None = None) -> tuple[int, int, int]:
        """(experts per MoE layer in the GPU tier, experts the host tier must then hold, how many of
        those it cannot: 0 when the preload fits) of a preload."""
        moe, E = self.moe_layers, self.args.moe.num_experts
        g = min(E, self.gpu_tier.capacity // len(moe)) if gpu_per_layer is None else gpu_per_layer
        host_needed = len(moe) * (E - g)
        return g, host_needed, max(0, host_needed - (self.store.capacity - self.store.batch))

    def preload(self, gpu_per_layer: int | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Every expert into the GPU tier (the first `gpu_per_layer` of each MoE layer: default, an
        equal share of its slots) or the host tier (the rest); then decode and prefill read each
        where it lies (set_resident). Raises if the two tiers cannot hold the model."""
        if self.gpu_tier is None:
            raise ValueError("--preload needs the GPU expert path (--device cuda)")
        E, rs = self.args.moe.num_experts, self.manifest.layout.record_size
        g, host_needed, short = self._preload_split(gpu_per_layer)
        if short:
            gpu = format_bytes(len(self.moe_layers) * g * rs)
            raise BudgetError(
                f"--preload needs every expert in GPU or host memory: {format_bytes(self.manifest.total_expert_bytes)} of "
                f"experts, {gpu} in GPU slots, so the host tier must hold {format_bytes(host_needed * rs)}; raise --host-mem "
                f"to at least {format_bytes((host_needed + self.store.batch) * rs)} (or --gpu-mem), or drop --preload"
            )
        heat, note = (read_heat(self.dir, (max(self.moe_layers) + 1, E)) if self.config.placement_heat
                      else (None, ""))
        if note:
            self.choices.append(note)
        self.place_experts(g, E - g, progress, heat)
        self.set_resident(True)
        if heat is not None and self.adaptive:  # it goes on learning from where the last run left off
            self.gpu_tier.resident.placement.heat[:] = heat

    def set_resident(self, on: bool, adaptive: bool | None = None) -> None:
        """Read every expert where it lies (on) or go back to copying misses into GPU slots (off).
        On needs every expert in one of the two tiers (place_experts) and no --prefetch. `adaptive`
        (default: unless the cache policy is static): swap experts between the tiers by their use
        as decode runs (ResidentTable.revise)."""
        if not on:
            if self.gpu_tier is not None:
                self.gpu_tier.drop_resident()
                self._attach_cpu_share()
            return
        if self.gpu_tier is None:
            raise ValueError("resident experts need the GPU expert path (--device cuda)")
        if self.guesses:
            raise ValueError("--preload excludes --prefetch: preloaded experts are read in place, never copied")
        self.gpu_tier.make_resident(self.store, self.moe_layers, self.args.moe.num_experts, adaptive)
        self._attach_cpu_share()

    @property
    def adaptive(self) -> bool:
        """Whether resident experts swap places between the tiers by use."""
        return self.resident and self.gpu_tier.resident.placement is not None

    # -- running ---------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.args.max_position_embeddings

    def new_state(self) -> SequenceState:
        """A new sequence's state: a StatePool slot's buffers while one is free (batched decode on
        the GPU), else buffers of its own."""
        return self._slot_state() or self.model.new_state(self.dtype, self.device)

    def pooled(self, state: SequenceState) -> SequenceState:
        """`state` in a pool slot's buffers (a copy) where the engine pools states and one is free;
        else `state` itself."""
        if state.slot is not None or (pooled := self._slot_state()) is None:
            return state
        pooled.load(state)
        return pooled

    def _slot_state(self) -> SequenceState | None:
        """A new state in a free pool slot, or None (no pool, or every slot taken)."""
        if self.pool is None:
            return None
        state = SequenceState([])
        return state if self.pool.acquire(state) else None

    def context(self, states: list[SequenceState], lengths: list[int] = (), last_only: bool = True) -> StepContext:
        """The context of one step of the model over `states` (models/context.py)."""
        return StepContext(states, lengths, self.experts, self.moe_steps, self.timer, self.guesses, last_only=last_only)

    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, state: SequenceState, last_only: bool = True) -> torch.Tensor:
        """Feed ids into state (updated in place), in chunks of `prefill_chunk` tokens, each reading
        every expert it needs once per layer -> logits of the last position [1, vocab] (of every
        position [T, vocab] with last_only False). Inference mode per call, never across a
        generator's yield."""
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()  # on the host, which hashes the n-grams and keeps the tokens
        self._check_context(state, ids.shape[0])
        chunk = self.config.prefill_chunk
        tokens, logits = ids.tolist(), []
        for start in range(0, ids.shape[0], chunk):
            logits.append(self._step(ids[start : start + chunk], [state], (), last_only))
            state.tokens += tokens[start : start + chunk]
        return logits[-1] if last_only else torch.cat(logits)

    def release(self, state: SequenceState) -> None:
        """Free a sequence's caches (a preempted one's; its pool slot given back), keeping its
        tokens for `recompute`."""
        state.leave_slot()
        state.layers, state.ngrams, state.slot = [], {}, None

    def recompute(self, state: SequenceState) -> None:
        """Rebuild a released sequence's caches in place by prefilling its tokens again: the state
        continues as before (up to the prefill's fp32 rounding, as a prefix cache's states do)."""
        tokens, state.tokens, state.position = state.tokens, [], 0
        if self.pool is None or not self.pool.acquire(state):
            fresh = self.model.new_state(self.dtype, self.device)
            state.layers, state.ngrams = fresh.layers, fresh.ngrams
        self.forward(tokens, state)

    @torch.inference_mode()
    def forward_batch(self, ids: list[list[int]], states: list[SequenceState]) -> torch.Tensor:
        """One step over several sequences at once: ids[i] continue states[i] (updated in place) ->
        the logits of each one's last position [len(states), vocab]. Each sequence attends over its
        own cache; the rest of a layer runs on all the tokens together, so its routed experts read
        each expert the batch needs once. One step, not chunked: keep the tokens to a prefill chunk."""
        if len(ids) != len(states) or not ids or any(not seq for seq in ids) or len({id(s) for s in states}) < len(states):
            raise ValueError("forward_batch takes one non-empty list of ids for each of several distinct states")
        for seq, state in zip(ids, states):
            self._check_context(state, len(seq))
        if self.cuda_graphs and all(len(seq) == 1 and state.slot is not None for seq, state in zip(ids, states)):
            if (logits := self._pooled_step([seq[0] for seq in ids], states)) is not None:
                return logits
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.long)
        logits = self._step(flat, states, [len(seq) for seq in ids], last_only=True)
        for seq, state in zip(ids, states):
            state.tokens += seq
        return logits

    def _pooled_step(self, tokens: list[int], states: list[SequenceState]) -> torch.Tensor | None:
        """One decode step of sequences in StatePool slots: the graph of the smallest bucket of
        slots [0, b) (a power of two, or every slot) that holds them, the other slots idle; None
        where the bucket is larger than a graph takes (the step then runs eagerly)."""
        from .runtime.graphs import DecodeGraph

        pool, top = self.pool, max(state.slot for state in states) + 1
        b = min(1 << (top - 1).bit_length(), len(pool.slots))
        if b > GRAPH_MAX_TOKENS:
            return None
        graph, holders = self._pool_graphs.get(b), pool.holders(b)
        if (graph is None or not graph.valid()
                or any(h is not None and h.position >= limit for h, limit in zip(holders, graph.limits))):
            # A slot whose sequence reached its scratch position grows (an idle one's too, after a
            # prefill): a new buffer, so the bucket's graph is recorded again.
            for i, holder in enumerate(holders):
                if holder is not None:
                    pool.make_room(i, holder.position + 1)
            self._pool_graphs.pop(b, None)  # its memory goes before the next one's is taken
            graph = self._pool_graphs[b] = DecodeGraph(self, pool.slots[:b])
        feed, running = [0] * b, [None] * b
        for state, token in zip(states, tokens):
            feed[state.slot], running[state.slot] = token, state
        logits = graph.step(feed, running)
        rows = [state.slot for state in states]
        return logits[: len(rows)] if rows == list(range(len(rows))) else logits[rows]

    def _check_context(self, state: SequenceState, tokens: int) -> None:
        if state.position + tokens > self.context_length:
            raise ContextLengthError(f"{state.position + tokens} tokens exceed the model's context length of {self.context_length}")

    def _step(self, ids: torch.Tensor, states: list[SequenceState], lengths: list[int], last_only: bool) -> torch.Tensor:
        """One forward of the model over ids [T] (on the host), the tokens of `states` one after
        another; their positions advanced."""
        if self.threads is not None:
            self.threads.update()
        if self.cpu_decode is not None and self.moe_steps and ids.shape[0] == len(states) <= self.cpu_decode.MAX_SEQUENCES:
            logits = self.cpu_decode(ids, states, self.moe_steps)  # a decode step: a token per sequence
            for state in states:
                state.position += 1
            return logits
        ctx = self.context(states, lengths, last_only)
        self.model.start_ngram_reads(ids, ctx)  # from the host's ids, before they go to the device
        try:
            logits = self.model(ids.to(self.device), ctx)
        except torch.cuda.OutOfMemoryError:
            # Cached experts stay valid (a slot is filled before it is used); the sequences' states
            # are incomplete and must not be continued.
            tier = f"{format_bytes(self.gpu_tier.pool.numel())} of GPU expert slots" if self.gpu_tier else "no GPU tier"
            raise GpuMemoryError(
                f"the GPU ran out of memory running {ids.shape[0]} tokens ({tier}): lower --gpu-mem, or send a shorter "
                f"prompt (prefill works in chunks of {self.config.prefill_chunk} tokens)"
            ) from None
        for state, n in zip(states, lengths or [ids.shape[0]]):
            state.position += n
        return logits

    def dense_bytes_per_token(self) -> int:
        """Bytes of dense weights a decode step reads: all but the embedding table (of which it reads
        one row), at their resident size (Int8Linear codes and scales are buffers, the rest parameters)."""
        total = 0
        for name, t in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            if "embed_tokens" not in name or self.args.tie_word_embeddings:
                total += t.numel() * t.element_size()
        return total

    @contextmanager
    def first_layers(self, n: int) -> Iterator[None]:
        """Run only the model's first n layers for the block (the bench's per-layer timing); the last
        one kept guesses no further."""
        layers, guesses = self.model.layers, self.guesses
        self.model.model.layers = torch.nn.ModuleList(list(layers)[:n])
        last = max((i for i in self.moe_layers if i < n), default=-1)
        self.guesses = {i: g for i, g in guesses.items() if i < last}
        try:
            yield
        finally:
            self.model.model.layers, self.guesses = layers, guesses

    @property
    def host_cache_bytes(self) -> int:
        """RAM the expert cache holds records in (--host-mem, rounded down to whole records)."""
        return self.store.capacity * self.store.record_size

    def counters(self) -> tuple[StoreStats, GpuTierStats | None, NgramStats]:
        """Copies of the expert store's, the GPU tier's and the n-gram rows' counters: the difference
        of two readings is what happened between them (after `settle`)."""
        gpu = replace(self.gpu_tier.stats) if self.gpu_tier is not None else None
        return replace(self.store.stats), gpu, replace(self.ngram_rows.stats)

    def settle(self, phase: str) -> None:
        """Bring the GPU tier's counters up to date after a phase of generation. Resident decode
        counts its expert lookups on the device: after "prefill" they are read at once (waiting for
        the GPU); after a "decode" step a copy is queued behind it, which the "sampled" phase that
        always follows collects once reading the token has waited for the GPU anyway, and where the
        placement adapts, experts swap places by those counts before the next step. A graph's "warmup"
        run counts nothing."""
        resident = self.gpu_tier.resident if self.gpu_tier is not None else None
        if resident is None:
            return
        if phase == "sampled":
            resident.collect(queued_only=True)
            resident.revise(self.store)
        elif phase == "warmup":  # a graph's warm-up run: its lookups are no token's
            resident.forget_uncollected()
        elif phase == "prefill":
            resident.collect()
        else:
            resident.queue()

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        state: SequenceState | None = None,
        logits_processor: LogitsProcessor | None = None,
        batched: bool = False,
        checkpoints: dict[int, Callable[[], None]] | None = None,
    ) -> Generation:
        """Iterate the result for a Step per generated token; it also carries timing statistics.

        A str prompt is plain text (control tokens need ids: Tokenizer.encode_chat renders a
        conversation). `state` continues an earlier sequence (the prompt's ids then follow its
        tokens); `logits_processor(generated_ids, logits) -> logits` sees each next-token
        distribution (fp32, on the CPU) before sampling: the hook for grammar-constrained decoding.
        It gets the same list every step, grown by one token: read it, do not keep or change it.
        `batched`: for each slice of the prefill and each decode step the iteration yields a
        ForwardRequest for the caller to run (with other generations' through forward_batch, or
        alone) before resuming it. `checkpoints[n]()` is called once n prompt tokens are in."""
        return Generation(self, prompt, params or SamplingParams(), state, logits_processor, batched, checkpoints)

    def _save_heat(self, heat: np.ndarray) -> None:
        if not heat.any():  # nothing decoded: keep what an earlier run saved
            return
        try:
            write_heat(self.dir, heat)
        except OSError as e:
            warnings.warn(f"placement heat not saved in {self.dir} ({e}): the next run's placement starts cold; "
                          "--no-placement-heat stops this warning", stacklevel=3)

    def close(self) -> None:
        """Stop the CPU share's threads and close the files; with --placement-heat, save what
        adaptive placement learned beside the model (experts/heat.py), for the next preload."""
        if self.config.placement_heat and self.adaptive:
            self.gpu_tier.resident.collect()
            self._save_heat(self.gpu_tier.resident.placement.current_heat())
        if self.gpu_tier is not None:
            self.gpu_tier.set_cpu_share(None)
        self.store.close()
        self.ngram_rows.close()
