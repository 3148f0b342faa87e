"""The Engine: one loaded model (dense weights resident, experts behind the store) and the generate
loop. The CLI, chat REPL and server are thin layers over `Engine.generate`."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ModelConfig
from .formats.packed import Manifest
from .formats.safetensors import SafetensorsFile
from .layers.int8_linear import use_int8_linears
from .layers.moe import SparseMoE
from .models import family
from .quant import quantize_int8_rows
from .runtime.expert_store import BudgetError, ExpertStore, StoreStats
from .runtime.experts import StreamedExperts
from .runtime.sampling import Sampler, SamplingParams, token_logprobs
from .runtime.state import SequenceState
from .runtime.stats import GpuTierStats, Timer
from .tokenizer import Tokenizer
from .utils import available_memory_bytes, cpu_has_native_bf16, format_bytes, peak_rss_bytes


LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class ContextLengthError(ValueError):
    pass


class GpuMemoryError(RuntimeError):
    """The GPU ran out of memory; the message names the budget to lower."""


@dataclass(slots=True)
class Step:
    """One generated token: its id, the text it completes (may be empty while a character or a
    possible stop string is still incomplete), and why generation ended, if it did."""

    token: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"
    # Only when SamplingParams.logprobs asks (token_logprobs says of which distribution): the
    # token's log-probability and the most likely (token id, log-probability) pairs.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_sections: dict[str, float] = field(default_factory=dict)  # seconds per section, summed over decode
    prefill_cache: StoreStats = field(default_factory=StoreStats)  # expert-store counters during prefill
    cache: StoreStats = field(default_factory=StoreStats)  # ... and during decode
    gpu_cache: GpuTierStats = field(default_factory=GpuTierStats)  # GPU tier counters during decode (GPU path)
    peak_rss: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        host_mem: int | None = None,
        top_k: int | None = None,
        io_threads: int = 8,
        verify: bool = True,
        prefill_chunk: int = 2048,
        gpu_mem: int | None = None,
        cache_policy: str = "mix",
        profile: bool = False,
        direct_io: bool = False,
        cuda_graphs: bool = True,
        dense_bits: int = 16,
        prefetch: bool = False,
        cpu_experts: int = 0,
        preload: bool = False,
    ):
        """Load a packed model: dense weights resident on `device`, experts behind the caches.

        host_mem: bytes of RAM for the expert cache (default: half the free RAM).
        gpu_mem: bytes of GPU memory for cached experts (cuda; default: what is free after the
        dense weights, minus a margin for states and activations).
        cache_policy: lru, lfu, mix or static (runtime/policy.py), for both tiers.
        profile: synchronize the device at every timed section, so the per-section split is true
        on a GPU (at some cost in speed); on the CPU timings are always true.
        direct_io: read expert records with O_DIRECT, bypassing the OS page cache.
        cuda_graphs: replay each layer's dense part from a CUDA graph during decode (cuda).
        dense_bits: 16, or 8 to keep the large dense projections and lm_head as int8 (quantized
        here from the 16-bit dense file; layers/int8_linear.py says which).
        prefetch: during decode, guess each MoE layer's experts one layer ahead and start copying
        them early (GPU path; runtime/gpu_experts.py). Changes timing only, never results.
        cpu_experts: during decode, compute up to this many of each layer's experts that sit in the
        host tier on the CPU while the GPU copies (or, preloaded, reads) the others (GPU path; needs
        numba; set_cpu_experts).
        preload: read every expert into the GPU tier or the host tier now (they must hold them all),
        then read each where it lies: no copies and no host sync per layer (GPU path; `preload`)."""
        self.dir = Path(model_dir)
        self.manifest = Manifest.load(self.dir)
        self.config = cfg = ModelConfig.from_dir(self.dir)
        self.tokenizer = Tokenizer.from_dir(self.dir)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu")
        if dtype is None:
            native_bf16 = self.device.type == "cuda" or cpu_has_native_bf16()
            dtype = torch.bfloat16 if native_bf16 else torch.float32
        self.dtype = dtype
        if dense_bits not in (16, 8):
            raise ValueError(f"--dense-bits must be 16 or 8, got {dense_bits}")
        self.dense_bits = dense_bits
        self.top_k = cfg.num_experts_per_tok if top_k is None else top_k  # 0 is refused below, not read as "unset"
        if not 1 <= self.top_k <= cfg.num_experts:
            raise ValueError(f"--k must be between 1 and {cfg.num_experts} (the model has {cfg.num_experts} experts)")
        self.prefill_chunk = prefill_chunk
        self.prefetch = prefetch
        self.cpu_experts = cpu_experts
        self._host_compute = None
        on_gpu = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs and on_gpu
        self.timer = Timer(sync=torch.cuda.synchronize if on_gpu and profile else None)
        self.model = self._load_dense()
        budget = host_mem if host_mem is not None else min(self.manifest.total_expert_bytes, available_memory_bytes() // 2)
        self.store = ExpertStore(
            self.dir, self.manifest, budget, self.top_k, io_threads, verify, on_gpu, direct_io, cache_policy
        )
        self.gpu_tier = None
        # CPU path: decode tokens' experts through the kernel, on PyTorch's cores. GPU path: built by set_cpu_experts.
        self.cpu_kernel = None if on_gpu else self._cpu_kernel(torch.get_num_threads())
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.top_k = self.top_k
                layer.mlp.experts = StreamedExperts(self.store, i, self.timer, self.cpu_kernel)
        if on_gpu:
            self.use_gpu_experts(gpu_mem, cache_policy)
            if preload:
                self.preload()
        self.stop_ids = set(cfg.eos_token_ids) | {
            i for t in ("<|im_end|>", "<|endoftext|>") if (i := self.tokenizer.token_to_id(t)) is not None
        }

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
        kernel = CpuExperts(self.manifest.layout, threads)
        kernel.warmup()
        return kernel

    def set_top_k(self, k: int) -> None:
        """Route each token to k experts from now on (at most the k the engine was loaded with)."""
        if not 1 <= k <= self.store.batch:
            raise ValueError(f"k must be between 1 and {self.store.batch}")
        self.top_k = k
        for layer in self.model.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.top_k = k

    def use_gpu_experts(self, gpu_mem: int | None, policy: str = "mix") -> None:
        """Route the experts through a tier of GPU slots and the Triton kernels (Triton is only
        imported here: the CPU path needs none of it)."""
        from .kernels.moe_gemv import MoeGemv
        from .kernels.moe_grouped import MoeGrouped
        from .runtime.gpu_experts import DECODE_MAX_TOKENS, GpuExpertTier, GpuRoutedExperts

        layout, cfg = self.manifest.layout, self.config
        staging = min(cfg.num_experts, DECODE_MAX_TOKENS * self.top_k)
        prefetch = self.top_k if self.prefetch else 0  # slots per region (two regions)
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
        gemv, grouped = MoeGemv(layout), MoeGrouped(layout)
        moe = self._moe_layers()
        for i, nxt in zip(moe, moe[1:] + [None]):
            self.model.layers[i].mlp.experts = GpuRoutedExperts(self.gpu_tier, self.store, i, gemv, grouped, self.timer, nxt)
        self.set_prefetch(self.prefetch)
        self.set_cpu_experts(self.cpu_experts)

    def set_prefetch(self, on: bool) -> None:
        """Guess each MoE layer's experts one layer ahead during decode (or stop). The guess runs in
        the previous MoE layer's dense part (captured in its CUDA graph), so one host sync per layer
        still reads the routing; needs the GPU path loaded with prefetch=True (its prefetch slots)."""
        from .runtime.gpu_experts import NextLayerGuess

        if on and not (self.gpu_tier is not None and self.gpu_tier.prefetch_slots):
            raise ValueError("prefetch needs the GPU expert path, loaded with prefetch=True")
        if on and self.resident:
            raise ValueError("--prefetch and --preload exclude each other: preloaded experts are read in place, never copied")
        moe = self._moe_layers()
        for i, nxt in zip(moe, moe[1:] + [None]):
            layers = self.model.layers
            layers[i].predict_next = NextLayerGuess(layers[nxt]) if on and nxt is not None else None

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
        from .runtime.gpu_experts import HostCompute, ResidentCpuShare

        tier, n = self.gpu_tier, self.cpu_experts
        if tier is None:
            return
        tier.host_compute = None
        if self.resident:
            if n and tier.cpu_share is not None and tier.cpu_share.handoff.max_cpu == n:
                return
            tier.set_cpu_share(ResidentCpuShare(tier, self.store, n) if n else None)
            return
        if n:
            if self._host_compute is None:
                self.cpu_kernel = self.cpu_kernel or self._cpu_kernel(required=True)  # default threads: all cores but one
                self._host_compute = HostCompute(self.cpu_kernel, self.top_k, self.dtype, self.device, n)
            self._host_compute.per_layer = n
            tier.host_compute = self._host_compute

    def _moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoE)]

    @property
    def resident(self) -> bool:
        """Whether every expert is read where it lies in the GPU or host tier (preload)."""
        return self.gpu_tier is not None and self.gpu_tier.table is not None

    def place_experts(self, gpu_per_layer: int, host_per_layer: int, progress: Callable[[int], None] | None = None) -> None:
        """Read experts [0, g) of each MoE layer into GPU slots and [g, g + h) into the host tier
        (`progress(bytes)` after each batch of reads). Experts an earlier placement left in the
        other tier (adaptive placement moves them) trade places first, without reading the disk."""
        E, rs, batch = self.config.num_experts, self.manifest.layout.record_size, self.store.batch
        tier, misplaced = self.gpu_tier, defaultdict(list)
        for layer, e in list(tier.slots.slot_of):
            if e >= gpu_per_layer:
                misplaced[layer].append(e)
        for layer, to_host in misplaced.items():
            to_gpu = [e for e in range(min(E, gpu_per_layer)) if (layer, e) in self.store.slots and (layer, e) not in tier.slots]
            for up, down in zip(to_gpu, to_host):
                tier.swap(self.store, layer, up, down)
        if misplaced and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the CPU reads host records unordered with the stream's copies
        for layer in self._moe_layers():
            host = list(range(gpu_per_layer, min(E, gpu_per_layer + host_per_layer)))
            for start in range(0, len(host), batch):
                for _ in self.store.load(layer, host[start : start + batch]):
                    pass
                if progress:
                    progress(len(host[start : start + batch]) * rs)
        for layer in self._moe_layers():
            experts = list(range(min(E, gpu_per_layer)))
            self.gpu_tier.preload(layer, experts, self.store)
            if progress:
                progress(len(experts) * rs)
        self.store.stats = StoreStats()

    def preload(self, gpu_per_layer: int | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Every expert into the GPU tier (the first `gpu_per_layer` of each MoE layer: default, an
        equal share of its slots) or the host tier (the rest); then decode and prefill read each
        where it lies (set_resident). Raises if the two tiers cannot hold the model."""
        if self.gpu_tier is None:
            raise ValueError("--preload needs the GPU expert path (--device cuda)")
        moe, E, rs = self._moe_layers(), self.config.num_experts, self.manifest.layout.record_size
        g = min(E, self.gpu_tier.capacity // len(moe)) if gpu_per_layer is None else gpu_per_layer
        host_needed = len(moe) * (E - g)
        if host_needed > self.store.capacity - self.store.batch:
            gpu = format_bytes(len(moe) * g * rs)
            raise BudgetError(
                f"--preload needs every expert in GPU or host memory: {format_bytes(self.manifest.total_expert_bytes)} of "
                f"experts, {gpu} in GPU slots, so the host tier must hold {format_bytes(host_needed * rs)}; raise --host-mem "
                f"to at least {format_bytes((host_needed + self.store.batch) * rs)} (or --gpu-mem), or drop --preload"
            )
        self.place_experts(g, E - g, progress)
        self.set_resident(True)

    def set_resident(self, on: bool, adaptive: bool | None = None) -> None:
        """Read every expert where it lies (on) or go back to copying misses into GPU slots (off).
        On needs every expert in one of the two tiers (place_experts) and no --prefetch. `adaptive`
        (default: unless the cache policy is static): swap experts between the tiers by their use
        as decode runs (GpuExpertTier.revise_placement)."""
        if not on:
            if self.gpu_tier is not None:
                self.gpu_tier.drop_resident()
                self._attach_cpu_share()
            return
        if self.gpu_tier is None:
            raise ValueError("resident experts need the GPU expert path (--device cuda)")
        if self.prefetch_on:
            raise ValueError("--preload excludes --prefetch: preloaded experts are read in place, never copied")
        self.gpu_tier.make_resident(self.store, self._moe_layers(), self.config.num_experts, adaptive)
        self._attach_cpu_share()

    @property
    def prefetch_on(self) -> bool:
        return any(layer.predict_next is not None for layer in self.model.layers)

    def _load_dense(self) -> torch.nn.Module:
        with torch.device("meta"):
            model = family(self.config.model_type).Model(self.config)
        int8 = set(use_int8_linears(model)) if self.dense_bits == 8 else set()
        weights = {}
        with SafetensorsFile(self.dir / self.manifest.dense_file) as f:
            for name in f.tensors:
                module, _, kind = name.rpartition(".")
                if module in int8 and kind == "weight":  # quantized from the stored 16-bit values, on the device
                    weights[name], weights[f"{module}.scale"] = quantize_int8_rows(f.read(name).to(self.device))
                else:
                    weights[name] = f.read(name).to(self.device, self.dtype)
        model.load_state_dict(weights, strict=True, assign=True)
        del weights  # the model's references are the only ones now: fusing frees each weight it copies
        model.fuse_projections()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the copies fusing freed: the GPU tier is sized by what the driver reports free
        return model.eval()

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def new_state(self) -> SequenceState:
        return SequenceState(self.config, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, state: SequenceState) -> torch.Tensor:
        """Feed ids into state (updated in place), in chunks of `prefill_chunk` tokens, each reading
        every expert it needs once per layer -> logits of the last position [1, vocab].
        Inference mode per call, never across a generator's yield."""
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        if state.position + ids.shape[0] > self.context_length:
            raise ContextLengthError(
                f"{state.position + ids.shape[0]} tokens exceed the model's context length of {self.context_length}"
            )
        try:
            for start in range(0, ids.shape[0], self.prefill_chunk):
                logits = self.model(ids[start : start + self.prefill_chunk], state, self.timer)
        except torch.cuda.OutOfMemoryError:
            # Cached experts stay valid (a slot is filled before it is used); this sequence's state
            # is incomplete and must not be continued.
            tier = f"{format_bytes(self.gpu_tier.pool.numel())} of GPU expert slots" if self.gpu_tier else "no GPU tier"
            raise GpuMemoryError(
                f"the GPU ran out of memory running {ids.shape[0]} tokens ({tier}): lower --gpu-mem, or send a shorter "
                f"prompt (prefill works in chunks of {self.prefill_chunk} tokens)"
            ) from None
        return logits

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        state: SequenceState | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> "Generation":
        """Iterate the result for a Step per generated token; it also carries timing statistics.

        `state` continues an earlier sequence (the prompt's ids then follow its tokens);
        `logits_processor(generated_ids, logits) -> logits` sees each next-token distribution
        (fp32, on the CPU) before sampling: the hook for grammar-constrained decoding. It gets the
        same list every step, grown by one token: read it, do not keep or change it."""
        return Generation(self, prompt, params or SamplingParams(), state, logits_processor)

    def close(self) -> None:
        if self.gpu_tier is not None:
            self.gpu_tier.set_cpu_share(None)
        self.store.close()


class Generation:
    def __init__(self, engine: Engine, prompt, params: SamplingParams, state: SequenceState | None, logits_processor):
        self.engine, self.params, self.logits_processor = engine, params, logits_processor
        self.ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.state = state or engine.new_state()
        if not self.ids:
            raise ValueError("the prompt is empty")
        limit = engine.context_length
        used = self.state.position + len(self.ids)
        if used >= limit:
            raise ContextLengthError(
                f"the prompt needs {used} tokens of context but the model's context length is {limit}; shorten it"
            )
        self.max_tokens = min(params.max_tokens, limit - used)
        self.stats = GenerationStats(prompt_tokens=len(self.ids))

    def __iter__(self) -> Iterator[Step]:
        return self._run()

    def _run(self) -> Iterator[Step]:
        eng = self.engine
        sampler = Sampler(self.params, self.engine.config.vocab_size, eng.device, seen=self.ids)
        generated: list[int] = []
        text = _StopStrings(self.params.stop)
        decoder = eng.tokenizer.stream_decoder()
        graphs = None
        with self._measured(prefill=True):
            logits = eng.forward(self.ids, self.state)
        try:
            for n in range(self.max_tokens):
                with self._measured(prefill=False, forward=False):
                    model_row = logits[-1]  # the model's own distribution: what logprobs report
                    row = model_row
                    if self.logits_processor is not None:
                        row = self.logits_processor(generated, row.cpu()).to(eng.device)
                    token = sampler(row)  # the one host sync per token: reading the token
                    generated.append(token)
                    if token in eng.stop_ids and not self.params.ignore_eos:
                        step = Step(token, text.flush(decoder.flush()), "stop")
                    else:
                        piece, stopped = text.push(decoder.push(token))
                        if stopped:
                            step = Step(token, piece, "stop")
                        elif n == self.max_tokens - 1:
                            step = Step(token, piece + text.flush(decoder.flush()), "length")
                        else:
                            step = Step(token, piece)
                    if self.params.logprobs is not None:
                        step.logprob, step.top_logprobs = token_logprobs(model_row, token, self.params.logprobs)
                yield step  # outside the measured block: the consumer's time is not ours
                if step.finish_reason:
                    return
                with self._measured(prefill=False):
                    if graphs is None and eng.cuda_graphs:
                        from .runtime.graphs import GraphedDecoder

                        graphs = GraphedDecoder(eng, self.state, self.state.position + self.max_tokens - n)
                    logits = graphs.step(token) if graphs is not None else eng.forward([token], self.state)
                    self.stats.decode_tokens += 1
        finally:
            if graphs is not None:
                graphs.release()
            self.stats.peak_rss = peak_rss_bytes()

    @contextmanager
    def _measured(self, prefill: bool, forward: bool = True):
        """Add the enclosed work's wall time, timed sections and expert-store counters to this
        generation's statistics. Only the work itself is counted: a server interleaves several
        generations, and time spent suspended at a yield belongs to others. A `forward` block runs
        the model; the expert lookups that resident decode counts on the device are read at its
        end: after prefill at once (a read that waits for the GPU), after a decode step by a copy
        queued behind it, which the sampling block that always follows collects once reading the
        token has waited for the GPU anyway (and where the placement adapts, swaps experts by them
        before the next step). No yield comes between the two, so the counts stay this generation's."""
        eng, stats = self.engine, self.stats
        t0, sections, cache = time.perf_counter(), dict(eng.timer.seconds), replace(eng.store.stats)
        gpu = replace(eng.gpu_tier.stats) if eng.gpu_tier is not None else None
        try:
            yield
        finally:
            if eng.gpu_tier is not None:
                if not forward:
                    eng.gpu_tier.collect_stats(queued_only=True)
                    eng.gpu_tier.revise_placement(eng.store)  # adaptive resident placement: between steps
                elif prefill:
                    eng.gpu_tier.collect_stats()
                else:
                    eng.gpu_tier.queue_stats()
            seconds, moved = time.perf_counter() - t0, eng.store.stats - cache
            if prefill:
                stats.prefill_seconds += seconds
                stats.prefill_cache += moved
            else:
                stats.decode_seconds += seconds
                stats.cache += moved
                if gpu is not None:
                    stats.gpu_cache += eng.gpu_tier.stats - gpu
                for name, total in eng.timer.seconds.items():
                    if total != sections.get(name, 0.0):
                        stats.decode_sections[name] = stats.decode_sections.get(name, 0.0) + total - sections.get(name, 0.0)


class _StopStrings:
    """Holds back streamed text that could still turn into a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self, tail: str = "") -> str:
        out, _ = self.push(tail)
        out, self.pending = out + self.pending, ""
        return out
