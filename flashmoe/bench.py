"""`flashmoe bench`: scenarios S1 (decode) and S2 (prefill) of the benchmark spec on a model of a
named shape, synthesized straight into the packed format with random weights (fixed seed).

The lent machines' disks cannot hold a 397B model, so the model is a slice of its first L
layers and every memory budget is the full model's scaled by L / layers. Tiers: experts
[0, g) of each layer sit in GPU slots, [g, g + h) in the host tier, the rest on disk, read with
O_DIRECT (no page cache). Both tiers use the static policy: random routing has no locality, so
the placement is the cache; `adaptive` rows let resident decode swap experts between the tiers by
their use (what the default policy does with --preload). Reported beside each measurement: the
roofline from the bytes each tier moved per token and bandwidths measured in the same run.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
from contextlib import contextmanager
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig
from .synthetic import hf_tensor_specs, random_init
from .formats.packed import DENSE_FILE, ExpertFile, Manifest, RecordLayout
from .formats.safetensors import SafetensorsWriter, read_into
from .layers.int8_linear import is_int8_linear
from .models import family
from .runtime.locality import WINDOWS, StreamGenerator, fit_replay, load_entropy, rank_shares, reuse_profile
from .runtime.locality import sorted_shares
from .runtime.routing_trace import ReplayExperts, RoutingTrace, wrapped_experts
from .tokenizer_build import write_qwen35_tokenizer

_QWEN35 = dict(
    model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=4096, num_hidden_layers=60,
    num_attention_heads=32, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
    linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
    num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
    rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=False, eos_token_id=248046,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)
PRESETS = {
    "qwen3.5-397b-a17b": _QWEN35,
    "qwen3-next-80b-a3b": {
        **_QWEN35, "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 16, "linear_num_value_heads": 32, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "intermediate_size": 5120,
    },
}
GPU_MARGIN = 6 << 30  # KV/state, activations, staging slots, CUDA context (full model)
RAM_RESERVE = 24 << 30  # OS, the process, dense weights in flight


def preset_config(name: str, layers: int | None = None) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[name])
    full = cfg["num_hidden_layers"]
    cfg["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(full)]
    if layers:
        cfg["num_hidden_layers"], cfg["layer_types"] = layers, cfg["layer_types"][:layers]
    return cfg


def dense_bytes(cfg: dict, dense_bits: int = 16) -> int:
    """Resident bytes of every non-expert weight of a model of this shape: bf16, or with
    dense_bits 8 the int8 projections at one byte per weight plus an fp32 scale per row."""
    total = 0
    for name, shape, _ in hf_tensor_specs(cfg):
        if ".experts." in name:
            continue
        module, _, kind = name.rpartition(".")
        if dense_bits == 8 and kind == "weight" and is_int8_linear(module):
            total += torch.Size(shape).numel() + 4 * shape[0]
        else:
            total += 2 * torch.Size(shape).numel()
    return total


def synthesize(out: Path, cfg: dict, bits: int, group_size: int = 64, seed: int = 0, device="cpu", log=print) -> Path:
    """Write a packed model of this shape with random weights straight into `out` (skipped if it is
    already there with the same shape and quantization)."""
    layout = RecordLayout.build(cfg["hidden_size"], cfg["moe_intermediate_size"], bits, group_size)
    stamp = {"bench_config": cfg, "bits": bits, "group_size": group_size, "seed": seed}
    if (out / "bench.json").exists() and json.loads((out / "bench.json").read_text()) == stamp:
        return out
    fam = family(ModelConfig.from_dict(cfg).model_type)
    dense = [(fam.canonical_name(n), shape, kind) for n, shape, kind in hf_tensor_specs(cfg) if ".experts." not in n]
    need = cfg["num_hidden_layers"] * cfg["num_experts"] * layout.record_size + 2 * sum(math.prod(s) for _, s, _ in dense)
    _check_disk(out, need)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_qwen35_tokenizer(out)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    writer = SafetensorsWriter(out / DENSE_FILE, [(n, torch.bfloat16, s) for n, s, _ in dense], {"format": "pt"})
    for name, shape, kind in dense:
        writer.write(name, random_init(shape, kind, gen).to(torch.bfloat16).cpu())
    writer.close()
    (out / "experts").mkdir(exist_ok=True)
    files = []
    crc_pool = ThreadPoolExecutor(os.cpu_count() or 4)
    for layer in range(cfg["num_hidden_layers"]):
        rel = f"experts/layer_{layer:03d}.bin"
        crcs = []
        with open(out / rel, "wb") as f:
            for start in range(0, cfg["num_experts"], 32):
                records = random_records(layout, min(32, cfg["num_experts"] - start), gen).cpu().numpy()
                crcs += crc_pool.map(zlib.crc32, list(records))
                f.write(records.data)
            f.flush()
            os.fsync(f.fileno())  # written back now: the disk probe that follows must not race the writeback
        files.append(ExpertFile(layer, rel, cfg["num_experts"], tuple(crcs)))
        log(f"  synthesized layer {layer}: {cfg['num_experts']} experts ({time.perf_counter() - t0:.0f} s)")
    Manifest(layout, tuple(files), DENSE_FILE, "bfloat16", "flashmoe bench (random weights)").save(out)
    (out / "bench.json").write_text(json.dumps(stamp))
    return out


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _check_disk(out: Path, need: int) -> None:
    """Refuse to start a synthesis that cannot fit: what `out` holds is rewritten, so it counts as
    free; the other models synthesized beside it are named, with their sizes, as what to delete."""
    parent = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(parent).free + _tree_bytes(out)
    if need <= free:
        return
    others = [p for p in sorted(out.parent.glob("*")) if p != out and (p / "bench.json").exists()] if out.parent.exists() else []
    listed = ", ".join(f"{p} ({_tree_bytes(p) / 2**30:.1f} GiB)" for p in others)
    raise RuntimeError(f"synthesizing {out.name} needs {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are free there"
                       + (f"; delete models synthesized earlier ({listed})" if others else "")
                       + ", or pass --workdir on a larger disk")


def random_records(layout: RecordLayout, n: int, gen: torch.Generator) -> torch.Tensor:
    """n expert records: random codes; scales and biases that make each weight row zero-mean with
    unit-gain variance (so activations stay finite through any number of layers)."""
    records = torch.randint(0, 256, (n, layout.record_size), dtype=torch.uint8, generator=gen, device=gen.device)
    if layout.bits == 16:
        for s in layout.segments:
            w = torch.randn(n, *s.shape, generator=gen, device=gen.device) / s.shape[1] ** 0.5
            records[:, s.offset : s.offset + s.nbytes] = w.to(torch.bfloat16).view(n, -1).view(torch.uint8)
        return records
    levels = (1 << layout.bits) - 1
    code_std = (levels * (levels + 2) / 12) ** 0.5  # std of a uniform code in [0, levels]
    for s in layout.segments:
        if s.name.endswith(".scales"):
            k = layout.hidden_size if s.name.startswith("gate_up") else layout.intermediate_size
            scale = torch.full((n, *s.shape), 1 / (code_std * k**0.5), device=gen.device)
            bias = -scale * levels / 2
            for t, seg_name in ((scale, s.name), (bias, s.name.replace("scales", "biases"))):
                seg = next(x for x in layout.segments if x.name == seg_name)
                records[:, seg.offset : seg.offset + seg.nbytes] = t.to(torch.bfloat16).view(n, -1).view(torch.uint8)
    return records


@dataclass
class Tiers:
    gpu_per_layer: int
    host_per_layer: int
    experts_per_layer: int
    gpu_fraction: float
    host_fraction: float
    disk_fraction: float
    notes: str


def plan_tiers(full_cfg: dict, layout: RecordLayout, gpu_total: int, ram_total: int, gpu_mem=None, host_mem=None,
               dense_bits: int = 16) -> Tiers:
    """Tiers for the full model, as fractions of its experts, from the machine (or given budgets)."""
    n_moe = full_cfg["num_hidden_layers"]
    E = full_cfg["num_experts"]
    all_experts = n_moe * E * layout.record_size
    dense = dense_bytes(full_cfg, dense_bits)
    gpu = gpu_mem if gpu_mem is not None else max(0, gpu_total - dense - GPU_MARGIN)
    host = host_mem if host_mem is not None else max(0, ram_total - RAM_RESERVE)
    per_layer = n_moe * layout.record_size  # bytes of one expert index across all layers
    g = min(E, gpu // per_layer)
    h = min(E - g, host // per_layer)
    notes = (
        f"full model: experts {all_experts / 2**30:.1f} GiB, dense {dense / 2**30:.1f} GiB ({dense_bits}-bit); "
        f"GPU tier = GPU {gpu_total / 2**30:.0f} GiB - dense - {GPU_MARGIN >> 30} GiB margin = {gpu / 2**30:.1f} GiB; "
        f"host tier = RAM {ram_total / 2**30:.0f} GiB - {RAM_RESERVE >> 30} GiB reserve = {host / 2**30:.1f} GiB"
    )
    return Tiers(g, h, E, g / E, h / E, 1 - (g + h) / E, notes)


@dataclass
class Bandwidths:
    pcie_h2d: float = 0.0  # bytes/s, pinned host -> device, record-sized copies
    hbm_copy: float = 0.0  # bytes/s, read + written
    disk_read: float = 0.0  # bytes/s, O_DIRECT parallel record reads


def hbm_copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    return repeats * 2 * nbytes / (time.perf_counter() - t0)


def measure_bandwidths(model_dir: Path, layout: RecordLayout, threads: int = 8) -> Bandwidths:
    bw = Bandwidths()
    rs = layout.record_size
    n = max(8, (1 << 30) // rs)
    host = torch.empty(n, rs, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, rs, dtype=torch.uint8, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        dev[i].copy_(host[i], non_blocking=True)
    torch.cuda.synchronize()
    bw.pcie_h2d = n * rs / (time.perf_counter() - t0)
    del dev
    bw.hbm_copy = hbm_copy_bandwidth()
    # Disk: random records from the last quarter of every layer file (where the disk tier lives),
    # read the way the store reads them (`threads` parallel O_DIRECT preads), about 2 GiB.
    files = sorted((model_dir / "experts").glob("layer_*.bin"))
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
    rng = torch.Generator().manual_seed(3)
    jobs = []
    for _ in range(2 * n):
        fd = fds[int(torch.randint(len(fds), (1,), generator=rng))]
        records = os.fstat(fd).st_size // rs
        jobs.append((fd, int(torch.randint(records * 3 // 4, records, (1,), generator=rng)) * rs))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: None, range(threads)))  # threads started before the clock
        t0 = time.perf_counter()
        list(pool.map(lambda j: read_into(j[1][0], host[j[0] % n], j[1][1]), enumerate(jobs)))
        bw.disk_read = len(jobs) * rs / (time.perf_counter() - t0)
    for fd in fds:
        os.close(fd)
    return bw


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
    resident: bool = False  # every expert read where it lies, host-resident ones in place over PCIe (preload)
    adaptive: bool = False  # ... and swapped between the tiers by use (GpuExpertTier.revise_placement)
    swaps_per_token: float = 0.0  # experts moved to the GPU per timed token (each swap moves two records)
    warmup_tokens: int = 0  # decoded before the timed runs, for the adaptive placement to settle
    warmup_swaps: int = 0  # ... and the swaps made during them
    ms_per_layer: float = 0.0  # (t_token - t_token over the first L/2 layers) / (L - L/2)
    ms_outside_layers_profiled: float = 0.0  # the earlier estimate: what the profiled pass's sections leave
    tps_extrapolated_profiled: float = 0.0  # t60 with that estimate (the rows of earlier sessions)


def steady_seconds_per_token(engine, prompt: list[int], params) -> tuple[float, "Generation"]:
    """Wall seconds per decoded token from the second decode step on (the first captures the
    decode graphs), and the generation (its stats count every step)."""
    if params.max_tokens < 4:
        raise ValueError("S1 needs at least 4 tokens: the first decode step captures graphs and is not timed")
    gen = engine.generate(prompt, params)
    stamps = [time.perf_counter() for _ in gen]  # after each token is sampled
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2), gen


@contextmanager
def first_layers(engine, n: int):
    """Run only the model's first n layers for the block (the last kept one guesses no further)."""
    layers = engine.model.model.layers
    kept = list(layers)[:n]
    guess, kept[-1].predict_next = kept[-1].predict_next, None
    engine.model.model.layers = torch.nn.ModuleList(kept)
    try:
        yield
    finally:
        engine.model.model.layers = layers
        kept[-1].predict_next = guess


def run_decode(engine, prompt_len: int, tokens: int, layers_full: int, bw: Bandwidths, routing: str = "uniform",
               repeats: int = 3) -> DecodeResult:
    """Greedy decode, timed from its second step (the first captures the decode graphs), and the
    same over the first half of the layers, alternating, `repeats` times each: the difference of
    the medians gives the time per layer and, by subtraction, the time outside the layers. Then
    once more with per-section synchronization for the breakdown (whose own remainder,
    `outside_profiled`, over-counts: every section's sync adds to it)."""
    from .runtime.sampling import SamplingParams

    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, min(150000, engine.config.vocab_size), (prompt_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    list(engine.generate(prompt[:4], SamplingParams(max_tokens=4, temperature=0)))  # compile kernels for this k
    L = engine.config.num_hidden_layers
    full, half = [], []
    for _ in range(repeats):
        full.append(steady_seconds_per_token(engine, prompt, params))
        with first_layers(engine, L // 2):
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
    hbm = _hbm_bytes_per_token(engine) + engine.top_k * rs * len(engine.config.moe_layers)
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
        prefetch=engine.prefetch_on,
        prefetch_accuracy=gpu.prediction_accuracy,
        prefetch_hits_per_token=gpu.prefetch_hits / n,
        prefetch_wasted_bytes_per_token=(gpu.prefetched - gpu.prefetch_hits) * rs / n,
        cpu_experts=engine.cpu_experts,
        cpu_experts_per_token=gpu.cpu_computed / n,
        resident=engine.resident,
        adaptive=engine.gpu_tier is not None and engine.gpu_tier.placement is not None,
        swaps_per_token=gpu.swapped / n,
    )


def _hbm_bytes_per_token(engine) -> int:
    """Dense weights a decode step reads (all but the embedding table, of which it reads one row),
    at their resident size: Int8Linear codes and scales are buffers, the rest parameters."""
    total = 0
    for name, t in itertools.chain(engine.model.named_parameters(), engine.model.named_buffers()):
        if "embed_tokens" in name and not engine.config.tie_word_embeddings:
            continue
        total += t.numel() * t.element_size()
    return total


def run_prefill(engine, prompt_len: int, layers_full: int) -> dict:
    from .runtime.sampling import SamplingParams

    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, min(150000, engine.config.vocab_size), (prompt_len,), generator=g).tolist()
    list(engine.generate(prompt[:16], SamplingParams(max_tokens=1, temperature=0)))  # warm the grouped path
    gen = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
    for _ in gen:
        pass
    s = gen.stats
    L = engine.config.num_hidden_layers
    ttft = s.prefill_seconds
    return {
        "prompt_tokens": prompt_len,
        "ttft_s": ttft,
        "tps": prompt_len / ttft,
        "ttft_s_extrapolated": ttft * layers_full / L,
        "tps_extrapolated": prompt_len / (ttft * layers_full / L),
        "host_reads_bytes": s.prefill_cache.bytes_read,
        "resident": engine.resident,
    }


def place_tiers(engine, tiers: Tiers, resident: bool = False, adaptive: bool = False) -> None:
    """GPU slots get experts [0, g) of each layer, the host tier [g, g + h); the rest stays on disk
    (Engine.place_experts). Resident: read every expert where it lies (needs no disk tier), and
    with `adaptive` swap experts between the tiers by use."""
    engine.set_resident(False)
    engine.place_experts(tiers.gpu_per_layer, tiers.host_per_layer)
    engine.set_resident(resident, adaptive)


def fit_trace_replays(trace: RoutingTrace, num_experts: int, ks: list[int], log=print) -> tuple[dict, dict]:
    """A stream generator per k with the trace's locality at this shape (runtime/locality.py), and
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
    moe_layers, E = len(engine.config.moe_layers), engine.config.num_experts
    ids = gen.generate(8 + warmup + (2 * repeats + 1) * (prompt_len + tokens), moe_layers).astype("int64")  # no wrap
    if shuffled:
        perm = np.stack([np.random.default_rng(5 + i).permutation(E) for i in range(moe_layers)])
        ids = perm[np.arange(moe_layers)[None, :, None], ids]
    stream = torch.from_numpy(ids)
    sync = not engine.resident  # the host reads the routing only where the real path does
    routing = "trace replay shuffled" if shuffled else "trace replay"
    with wrapped_experts(engine.model.layers, lambda i, inner: ReplayExperts(inner, stream[:, i], engine.timer, sync)):
        swapped = decode_warmup(engine, warmup)
        r = run_decode(engine, prompt_len, tokens, layers_full, bw, routing=routing, repeats=repeats)
    r.warmup_tokens, r.warmup_swaps = warmup, swapped
    return r


def decode_warmup(engine, tokens: int) -> int:
    """Decode `tokens` tokens untimed -> the swaps of the adaptive placement meanwhile."""
    if not tokens:
        return 0
    from .runtime.sampling import SamplingParams

    gen = engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    for _ in gen:
        pass
    return gen.stats.gpu_cache.swapped


def log_decode(r: DecodeResult, log=print) -> None:
    log(
        f"S1 K={r.k} {r.routing}{' resident' if r.resident else ''}{' adaptive' if r.adaptive else ''}"
        f"{' prefetch' if r.prefetch else ''}"
        f"{f' cpu-experts {r.cpu_experts}' if r.cpu_experts else ''}: {r.tps:.2f} tok/s measured ({r.ms_per_token:.2f} ms/token, {r.ms_outside_layers:.2f} outside "
        f"layers), {r.tps_extrapolated:.2f} tok/s extrapolated to {r.layers_full} layers; GPU hits "
        f"{r.gpu_hit_rate:.1%}, host hits {r.host_hit_rate:.1%}; bytes/token "
        + ", ".join(f"{t} {v / 2**20:.0f} MiB" for t, v in r.bytes_per_token.items())
        + "; roofline " + ", ".join(f"{t} {v:.2f} ms" for t, v in r.roofline_ms_per_token.items())
        + f" = {r.roofline_fraction:.0%} of measured"
        + (f"; prefetch: guessed {r.prefetch_accuracy:.1%} of experts, {r.prefetch_hits_per_token:.1f} copies/token "
           f"ahead of need, {r.prefetch_wasted_bytes_per_token / 2**20:.0f} MiB/token wasted" if r.prefetch else "")
        + (f"; swaps {r.swaps_per_token:.2f}/token ({r.warmup_swaps} in {r.warmup_tokens} warm-up tokens)" if r.adaptive else "")
    )
    log("  per layer (ms): " + " | ".join(f"{n} {v:.3f}" for n, v in r.breakdown_ms_per_layer.items()))


def result_json(**parts) -> str:
    return json.dumps(parts, indent=1, default=lambda v: asdict(v) if hasattr(v, "__dataclass_fields__") else str(v))


class Row(NamedTuple):
    routing: str
    prefetch: bool
    cpu_experts: int
    resident: bool
    adaptive: bool = False


ROUTINGS = ("uniform", "trace replay", "trace replay shuffled")


def decode_rows(cpu_experts: list[int], prefetch: bool, resident: bool, replay: bool, adaptive: bool = False) -> list[Row]:
    """The S1 rows of one k, in run order. The CPU share runs only in the resident rows when there
    are any: on the copying path it is a known loss (docs/EXPERIMENTS.md 26 and 39), and a
    full-size slice's rows cost minutes each. `adaptive` (resident only) adds rows whose placement
    adapts: uniform (its cost where there is nothing to learn) and, with a replay, the replay with
    shuffled ids, static and adaptive (what the adaptation wins when the placement starts blind)."""
    copy_cpu = () if resident else cpu_experts
    rows = [Row("uniform", ahead, cpu, False) for cpu in {0, *copy_cpu} for ahead in {False, prefetch}]
    rows += [Row("uniform", False, cpu, True) for cpu in {0, *cpu_experts}] * resident
    rows += [Row("trace replay", False, cpu, held) for held in sorted({False, resident})
             for cpu in {0, *cpu_experts} if cpu == 0 or held] * replay
    if resident and adaptive:
        rows += [Row("uniform", False, 0, True, True)]
        rows += [Row("trace replay shuffled", False, 0, True, False)] * replay
        rows += [Row("trace replay shuffled", False, cpu, True, True) for cpu in {0, *cpu_experts}] * replay
    return sorted(rows, key=lambda r: (ROUTINGS.index(r.routing), r.resident, r.adaptive, r.cpu_experts, r.prefetch))


def slice_engine(out: Path, cfg: dict, layout: RecordLayout, tiers: Tiers, k_max: int, dense_bits: int = 16,
                 prefetch: bool = False):
    """An engine over the synthesized slice with tier budgets for `tiers` (place_tiers fills them)."""
    from .engine import Engine

    rs, moe_layers = layout.record_size, len(ModelConfig.from_dict(cfg).moe_layers)
    return Engine(
        out, device="cuda", top_k=k_max, cache_policy="static", direct_io=True, verify=False,
        host_mem=(tiers.host_per_layer * moe_layers + k_max) * rs, gpu_mem=tiers.gpu_per_layer * moe_layers * rs,
        dense_bits=dense_bits, prefetch=prefetch,
    )


def run(preset: str, layers: int, bits: int, ks: list[int], prompt_tokens: int, tokens: int, prefills: list[int],
        workdir: Path, gpu_mem: int | None = None, host_mem: int | None = None, trace: Path | None = None,
        dense_bits: int = 16, prefetch: bool = False, cpu_experts: list[int] = (), resident: bool = False,
        adaptive: bool = False, warmup: int = 2048, log=print) -> dict:
    """The whole benchmark: synthesize (or reuse) the slice, measure the bandwidths, place the
    tiers, then S1 for each k (uniform routing; with `prefetch` again with next-layer prefetch; with
    each of `cpu_experts` again with that many misses per layer on the CPU (in the resident rows
    only, when `resident`), and with prefetch; with `resident` again with every expert read where
    it lies; then replayed from `trace` if given, also resident; with `adaptive` the rows of
    decode_rows, the adaptive replays timed after `warmup` tokens) and S2 for each prompt length
    (also resident). Returns the report. Replayed routing runs without prefetch: its ids come from
    a stream the router's guess cannot know."""
    from .utils import total_memory_bytes

    full, cfg = preset_config(preset), preset_config(preset, layers)
    replays, trace_stats = ({}, None)
    if trace is not None:  # before the slow parts: a bad trace fails at once
        replays, trace_stats = fit_trace_replays(RoutingTrace.load(trace), cfg["num_experts"], ks, log)
    out = workdir / f"{preset}-L{layers}-{bits}bit"
    log(f"synthesizing {preset} (first {layers} of {full['num_hidden_layers']} layers, {bits}-bit experts) in {out}")
    synthesize(out, cfg, bits, device="cuda", log=log)
    layout = RecordLayout.build(cfg["hidden_size"], cfg["moe_intermediate_size"], bits, 64)
    bw = measure_bandwidths(out, layout)
    log(f"bandwidths: PCIe H2D {bw.pcie_h2d / 1e9:.1f} GB/s, HBM copy {bw.hbm_copy / 1e9:.0f} GB/s, disk {bw.disk_read / 1e9:.2f} GB/s")
    gpu_total = torch.cuda.get_device_properties(0).total_memory
    tiers = plan_tiers(full, layout, gpu_total, total_memory_bytes(), gpu_mem, host_mem, dense_bits)
    log(f"tiers: GPU {tiers.gpu_fraction:.1%}, host {tiers.host_fraction:.1%}, disk {tiers.disk_fraction:.1%} ({tiers.notes})")
    k_max = max(ks)
    engine = slice_engine(out, cfg, layout, tiers, k_max, dense_bits, prefetch)
    report = {"preset": preset, "layers": layers, "bits": bits, "dense_bits": dense_bits, "device": torch.cuda.get_device_name(0),
              "bandwidths": bw, "tiers": tiers, "decode": [], "prefill": []}
    if trace_stats:
        report["trace"] = trace_stats
    if resident and tiers.disk_fraction > 0:
        log("resident rows skipped: they need every expert in GPU or host memory, and this placement has a disk tier")
        resident = False
    residency = sorted({False, resident})
    for k in sorted(ks, reverse=True):
        engine.set_top_k(k)
        for row in decode_rows(cpu_experts, prefetch, resident, bool(replays), adaptive):
            engine.set_resident(False)
            engine.set_prefetch(row.prefetch)
            engine.set_cpu_experts(row.cpu_experts)
            place_tiers(engine, tiers, row.resident, row.adaptive)  # the same first placement for every row, counters reset
            if row.routing == "uniform":
                r = run_decode(engine, prompt_tokens, tokens, full["num_hidden_layers"], bw)
            else:
                r = run_replayed_decode(engine, replays[k], prompt_tokens, tokens, full["num_hidden_layers"], bw,
                                        shuffled=row.routing.endswith("shuffled"), warmup=warmup if row.adaptive else 0)
            report["decode"].append(r)
            log_decode(r, log)
    engine.set_top_k(k_max)
    engine.set_prefetch(False)
    engine.set_cpu_experts(0)
    for held in residency:
        place_tiers(engine, tiers, held)
        for n in prefills:
            p = run_prefill(engine, n, full["num_hidden_layers"])
            report["prefill"].append(p)
            log(f"S2 prefill {n}{' resident' if held else ''}: {p['tps']:.0f} tok/s, TTFT {p['ttft_s']:.2f} s; "
                f"extrapolated {p['tps_extrapolated']:.0f} tok/s, TTFT {p['ttft_s_extrapolated']:.2f} s")
    return report
