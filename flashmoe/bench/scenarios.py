"""Scenarios S1 (decode) and S2 (prefill) of the benchmark spec on an engine over a synthesized
slice: timings, the per-layer breakdown, hit rates and bytes per tier, and the rooflines beside them;
replayed routing (analysis/locality.py) beside the random model's uniform routing."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

import torch

from ..analysis.locality import WINDOWS, StreamGenerator, fit_replay, load_entropy, rank_shares, reuse_profile, sorted_shares
from ..analysis.routing_trace import RoutingTrace, replayed_routing
from ..runtime.sampling import SamplingParams
from .probes import Bandwidths

if TYPE_CHECKING:
    from ..generation import Generation


@dataclass
class DecodeResult:
    k: int
    routing: str  # "uniform" (the random model's own), "trace replay" or "trace replay shuffled" (bench --trace)
    tokens: int
    seconds: float
    tps: float
    ms_per_token: float
    ms_outside_layers: float  # t_token - L x ms_per_layer
    tps_extrapolated: float  # 1 / (ms_outside_layers + layers_full x ms_per_layer)
    layers_in_slice: int
    layers_full: int
    breakdown_ms_per_layer: dict = field(default_factory=dict)
    gpu_hit_rate: float = 0.0
    host_hit_rate: float = 0.0
    bytes_per_token: dict = field(default_factory=dict)
    roofline_ms_per_token: dict = field(default_factory=dict)
    roofline_fraction: float = 0.0
    prefetch: bool = False  # next layer's experts guessed and copied ahead (Engine prefetch)
    prefetch_accuracy: float = 0.0  # share of a guessed layer's real experts that the guess named
    prefetch_hits_per_token: float = 0.0  # experts copied ahead that the routing used (misses saved)
    prefetch_wasted_bytes_per_token: float = 0.0  # experts copied ahead that it did not use
    cpu_experts: int = 0  # up to this many host-resident misses per layer computed on the CPU
    cpu_experts_per_token: float = 0.0  # ... how many were, per token
    cpu_split: list[int] = field(default_factory=list)  # of n host-resident experts the CPU took cpu_split[n] (measured rates)
    resident: bool = False  # every expert read where it lies, host-resident ones in place over PCIe (preload)
    adaptive: bool = False  # ... and swapped between the tiers by use (ResidentTable.revise)
    swaps_per_token: float = 0.0  # experts moved to the GPU per timed token (each swap moves two records)
    warmup_tokens: int = 0  # decoded before the timed runs, for the adaptive placement to settle
    warmup_swaps: int = 0  # ... and the swaps made during them
    ms_per_layer: float = 0.0  # (t_token - t_token over the first L/2 layers) / (L - L/2)
    ms_outside_layers_profiled: float = 0.0  # the earlier estimate: what the profiled pass's sections leave
    tps_extrapolated_profiled: float = 0.0  # t60 with that estimate (the rows of earlier sessions)
    # N-gram table rows (qwen4_exp), read a 4 KiB block each: random reads, bound by the disk's IOPS
    # rather than the bandwidth the rooflines divide by, so in no roofline term.
    ngram_rows_per_token: float = 0.0  # distinct rows looked up (one per head of each PLE layer a step)
    ngram_reads_per_token: float = 0.0  # ... blocks read from disk for them (the row cache's misses)
    ngram_bytes_per_token: float = 0.0
    ngram_hit_rate: float = 0.0  # share of the rows found in the row cache


def steady_seconds_per_token(engine, prompt: list[int], params) -> tuple[float, "Generation"]:
    """Wall seconds per decoded token from the second decode step on (the first captures the
    decode graphs, where the engine uses them), and the generation (its stats count every step)."""
    if params.max_tokens < 4:
        raise ValueError("S1 needs at least 4 tokens: the first decode step (which captures graphs) is not timed")
    gen = engine.generate(prompt, params)
    stamps = [time.perf_counter() for _ in gen]  # after each token is sampled
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2), gen


def run_decode(engine, prompt_len: int, tokens: int, layers_full: int, bw: Bandwidths, routing: str = "uniform",
               repeats: int = 3) -> DecodeResult:
    """Greedy decode, timed from its second step (the first may capture decode graphs), and the
    same over the first half of the layers, alternating, `repeats` times each: the difference of
    the medians gives the time per layer and, by subtraction, the time outside the layers. Then
    once more with per-section synchronization for the breakdown (whose own remainder,
    `outside_profiled`, over-counts: every section's sync adds to it)."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, min(150000, engine.args.vocab_size), (prompt_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    list(engine.generate(prompt[:4], SamplingParams(max_tokens=4, temperature=0)))  # compile kernels for this k
    L = engine.args.num_hidden_layers
    full, half = [], []
    for _ in range(repeats):
        full.append(steady_seconds_per_token(engine, prompt, params))
        with engine.first_layers(L // 2):
            half.append(steady_seconds_per_token(engine, prompt, params)[0])
    t_token, t_half = statistics.median(t for t, _ in full), statistics.median(half)
    s = full[0][1].stats
    n = s.decode_tokens
    per_layer = (t_token - t_half) / (L - L // 2)
    outside = t_token - L * per_layer
    t60 = outside + layers_full * per_layer
    # Profiled pass: synchronize at every section boundary so the split is true.
    engine.timer.sync = torch.cuda.synchronize if engine.device.type == "cuda" else None
    prof = engine.generate(prompt, params)
    for _ in prof:
        pass
    engine.timer.sync = None
    sec = prof.stats.decode_sections
    pn = prof.stats.decode_tokens
    in_layers = sum(v for k, v in sec.items() if k != "head")
    outside_profiled = (prof.stats.decode_seconds - in_layers) / pn
    rs = engine.manifest.layout.record_size
    dec = s.cache  # host tier during decode only: every copy to the GPU (prefetches too) is fetched through it
    gpu = s.gpu_cache
    host_loads = dec.hits + dec.misses + gpu.host_reads  # copies, and records the kernels read in place
    hbm = engine.dense_bytes_per_token() + engine.top_k * rs * len(engine.moe_layers)
    per_token = {
        "hbm": hbm,
        # the CPU's share is not loaded through the host tier: not counted; a swap moves a record each way
        "pcie": (host_loads + 2 * gpu.swapped) * rs / n,
        "disk": dec.bytes_read / n,
        "cpu": gpu.cpu_computed * rs / n,  # records the CPU read from RAM instead (no roofline term)
    }
    roof = {
        "hbm": per_token["hbm"] / bw.hbm_copy * 1e3,
        "pcie": per_token["pcie"] / bw.pcie_h2d * 1e3,
        "disk": per_token["disk"] / bw.disk_read * 1e3 if bw.disk_read else 0.0,
    }
    return DecodeResult(
        k=engine.top_k,
        routing=routing,
        tokens=n,
        seconds=s.decode_seconds,
        tps=1 / t_token,
        ms_per_token=t_token * 1e3,
        ms_outside_layers=outside * 1e3,
        tps_extrapolated=1 / t60,
        ms_per_layer=per_layer * 1e3,
        ms_outside_layers_profiled=outside_profiled * 1e3,
        tps_extrapolated_profiled=1 / ((t_token - outside_profiled) * layers_full / L + outside_profiled),
        layers_in_slice=L,
        layers_full=layers_full,
        breakdown_ms_per_layer={k: v * 1e3 / (pn * L) for k, v in sorted(sec.items())},
        gpu_hit_rate=gpu.hit_rate,  # prefetched experts count as hits: they need no copy when routed
        host_hit_rate=(dec.hits + gpu.host_reads) / host_loads if host_loads else 0.0,
        bytes_per_token=per_token,
        roofline_ms_per_token=roof,
        roofline_fraction=max(roof.values()) / (t_token * 1e3),
        prefetch=bool(engine.guesses),
        prefetch_accuracy=gpu.prediction_accuracy,
        prefetch_hits_per_token=gpu.prefetch_hits / n,
        prefetch_wasted_bytes_per_token=(gpu.prefetched - gpu.prefetch_hits) * rs / n,
        cpu_experts=engine.cpu_experts,
        cpu_experts_per_token=gpu.cpu_computed / n,
        cpu_split=list(engine.cpu_split.counts) if engine.cpu_split else [],
        resident=engine.resident,
        adaptive=engine.adaptive,
        swaps_per_token=gpu.swapped / n,
        ngram_rows_per_token=s.ngrams.rows / n,
        ngram_reads_per_token=s.ngrams.reads / n,
        ngram_bytes_per_token=s.ngrams.bytes_read / n,
        ngram_hit_rate=s.ngrams.hits / s.ngrams.rows if s.ngrams.rows else 0.0,
    )


def run_prefill(engine, prompt_len: int, layers_full: int) -> dict:
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, min(150000, engine.args.vocab_size), (prompt_len,), generator=g).tolist()
    list(engine.generate(prompt[:16], SamplingParams(max_tokens=1, temperature=0)))  # warm the grouped path
    gen = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
    for _ in gen:
        pass
    s = gen.stats
    L = engine.args.num_hidden_layers
    ttft = s.prefill_seconds
    return {
        "prompt_tokens": prompt_len,
        "ttft_s": ttft,
        "tps": prompt_len / ttft,
        "ttft_s_extrapolated": ttft * layers_full / L,
        "tps_extrapolated": prompt_len / (ttft * layers_full / L),
        "host_reads_bytes": s.prefill_cache.bytes_read,
        "ngram_reads": s.prefill_ngrams.reads,  # n-gram table blocks read from disk (qwen4_exp)
        "ngram_bytes_read": s.prefill_ngrams.bytes_read,
        "resident": engine.resident,
    }


def fit_trace_replays(trace: RoutingTrace, num_experts: int, ks: list[int], log=print) -> tuple[dict, dict]:
    """A stream generator per k with the trace's locality at this shape (analysis/locality.py), and
    the statistics for the report: the trace's, and those of a stream of each k."""
    stats = {
        "model": trace.model, "source": trace.source, "tokens": trace.tokens, "num_experts": trace.num_experts,
        "k": trace.k, "windows": list(WINDOWS), "reuse": reuse_profile(trace.ids).mean(0).tolist(),
        "load_entropy": float(load_entropy(sorted_shares(trace.ids, trace.num_experts)).mean()), "replay": {},
    }
    generators = {}
    for k in ks:
        generators[k] = gen = fit_replay(trace.ids, trace.num_experts, num_experts, k)
        sample = gen.generate(1000)
        shares = rank_shares(sample, num_experts)  # experts are ranks: top x% = the GPU tier of a static placement
        replay = stats["replay"][k] = {
            "reuse": reuse_profile(sample).mean(0).tolist(),
            "load_entropy": float(load_entropy(shares).mean()),
            "top_share": {f"{q:.0%}": float(shares[:, : int(q * num_experts)].sum(1).mean()) for q in (0.1, 0.25, 0.5)},
        }
        log(
            f"trace replay K={k}: reuse " + ", ".join(f"w={w} {u:.1%}" for w, u in zip(WINDOWS, replay["reuse"]))
            + " (trace: " + ", ".join(f"{u:.1%}" for u in stats["reuse"]) + f"), load entropy {replay['load_entropy']:.3f} "
            f"(trace: {stats['load_entropy']:.3f})"
        )
    return generators, stats


def run_replayed_decode(engine, gen: StreamGenerator, prompt_len: int, tokens: int, layers_full: int,
                        bw: Bandwidths, repeats: int = 3, shuffled: bool = False, warmup: int = 0) -> DecodeResult:
    """run_decode with every MoE layer's expert ids replaced by a generated stream (router weights
    kept). Stream ids are popularity ranks, so with the bench's static placement the GPU tier holds
    each layer's most used experts: the placement a deployment would choose from a known profile.
    `shuffled`: each layer's ids permuted at random, so the placement starts blind to popularity,
    as a deployment without a profile does. `warmup` tokens are decoded before the timed runs (an
    adaptive placement learns the popularity meanwhile)."""
    routing = "trace replay shuffled" if shuffled else "trace replay"
    with replayed_routing(engine, gen, 8 + warmup + (2 * repeats + 1) * (prompt_len + tokens), shuffled):  # no wrap
        swapped = decode_warmup(engine, warmup)
        r = run_decode(engine, prompt_len, tokens, layers_full, bw, routing=routing, repeats=repeats)
    r.warmup_tokens, r.warmup_swaps = warmup, swapped
    return r


def decode_warmup(engine, tokens: int) -> int:
    """Decode `tokens` tokens untimed -> the swaps of the adaptive placement meanwhile."""
    if not tokens:
        return 0
    gen = engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    for _ in gen:
        pass
    return gen.stats.gpu_cache.swapped


def log_decode(r: DecodeResult, log=print) -> None:
    log(
        f"S1 K={r.k} {r.routing}{' resident' if r.resident else ''}{' adaptive' if r.adaptive else ''}"
        f"{' prefetch' if r.prefetch else ''}"
        f"{f' cpu-experts {r.cpu_experts} (split {r.cpu_split}, {r.cpu_experts_per_token:.1f} a token)' if r.cpu_experts else ''}: {r.tps:.2f} tok/s measured ({r.ms_per_token:.2f} ms/token, {r.ms_outside_layers:.2f} outside "
        f"layers), {r.tps_extrapolated:.2f} tok/s extrapolated to {r.layers_full} layers; GPU hits "
        f"{r.gpu_hit_rate:.1%}, host hits {r.host_hit_rate:.1%}; bytes/token "
        + ", ".join(f"{t} {v / 2**20:.0f} MiB" for t, v in r.bytes_per_token.items())
        + "; roofline " + ", ".join(f"{t} {v:.2f} ms" for t, v in r.roofline_ms_per_token.items())
        + f" = {r.roofline_fraction:.0%} of measured"
        + (f"; prefetch: guessed {r.prefetch_accuracy:.1%} of experts, {r.prefetch_hits_per_token:.1f} copies/token "
           f"ahead of need, {r.prefetch_wasted_bytes_per_token / 2**20:.0f} MiB/token wasted" if r.prefetch else "")
        + (f"; swaps {r.swaps_per_token:.2f}/token ({r.warmup_swaps} in {r.warmup_tokens} warm-up tokens)" if r.adaptive else "")
        + (f"; n-gram rows {r.ngram_rows_per_token:.1f}/token, {r.ngram_hit_rate:.1%} cached, {r.ngram_reads_per_token:.1f} "
           f"reads ({r.ngram_bytes_per_token / 2**10:.0f} KiB)/token" if r.ngram_rows_per_token else "")
    )
    log("  per layer (ms): " + " | ".join(f"{n} {v:.3f}" for n, v in r.breakdown_ms_per_layer.items()))
