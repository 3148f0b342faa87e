"""`flashmoe bench`: scenarios S1 (decode) and S2 (prefill) of the benchmark spec on a model of a
named shape (presets), synthesized straight into the packed format with random weights (synthesis).

The lent machines' disks cannot hold a 397B model, so the model is a slice of its first L layers
and every memory budget is the full model's scaled by L / layers (tiers). Tiers: experts [0, g) of
each layer sit in GPU slots, [g, g + h) in the host tier, the rest on disk, read with O_DIRECT (no
page cache). Both tiers use the static policy: random routing has no locality, so the placement is
the cache; `adaptive` rows let resident decode swap experts between the tiers by their use (what
the default policy does with --preload). Reported beside each measurement (scenarios): the roofline
from the bytes each tier moved per token and bandwidths measured in the same run (probes).
N-gram tables (qwen4_exp) are synthesized at an eighth of their rows (presets.NGRAM_TABLE_DIVISOR:
the released one cannot fit the disk), the report saying so; the footprint counts them at full size.
Their rows are 16- or 8-bit as `flashmoe convert --ngram-bits` writes them (the same default).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from ..analysis.routing_trace import RoutingTrace
from ..formats.packed import check_ngram_bits, default_ngram_bits
from ..models import args_from_dict
from ..utils import total_memory_bytes
from .presets import preset_args, preset_config, shrink_ngram_tables
from .probes import measure_bandwidths
from .scenarios import fit_trace_replays, log_decode, run_decode, run_prefill, run_replayed_decode
from .synthesis import ngram_tables_report, record_layout, synthesize
from .tiers import place_tiers, plan_tiers, slice_engine


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


def run(preset: str, layers: int, bits: int, ks: list[int], prompt_tokens: int, tokens: int, prefills: list[int],
        workdir: Path, gpu_mem: int | None = None, host_mem: int | None = None, trace: Path | None = None,
        dense_bits: int = 16, prefetch: bool = False, cpu_experts: list[int] = (), resident: bool = False,
        adaptive: bool = False, warmup: int = 2048, ngram_bits: int | None = None, log=print) -> dict:
    """The whole benchmark: synthesize (or reuse) the slice, measure the bandwidths, place the
    tiers, then S1 for each k (uniform routing; with `prefetch` again with next-layer prefetch; with
    each of `cpu_experts` again with that many misses per layer on the CPU (in the resident rows
    only, when `resident`), and with prefetch; with `resident` again with every expert read where
    it lies; then replayed from `trace` if given, also resident; with `adaptive` the rows of
    decode_rows, the adaptive replays timed after `warmup` tokens) and S2 for each prompt length
    (also resident). Returns the report. Replayed routing runs without prefetch: its ids come from
    a stream the router's guess cannot know. N-gram rows of ngram_bits (None: the converter's default)."""
    ngram_bits = default_ngram_bits(bits) if ngram_bits is None else ngram_bits
    check_ngram_bits(ngram_bits)
    full, cfg = preset_args(preset), shrink_ngram_tables(preset_config(preset, layers))
    sliced = args_from_dict(cfg)
    replays, trace_stats = ({}, None)
    if trace is not None:  # before the slow parts: a bad trace fails at once
        replays, trace_stats = fit_trace_replays(RoutingTrace.load(trace), full.moe.num_experts, ks, log)
    ngram_tables = ngram_tables_report(full, sliced, ngram_bits)
    out = workdir / (f"{preset}-L{layers}-{bits}bit" + (f"-ngram{ngram_bits}" if ngram_tables else ""))
    log(f"synthesizing {preset} (first {layers} of {full.num_hidden_layers} layers, {bits}-bit experts) in {out}")
    for t in ngram_tables:
        log(f"n-gram table of layer {t['layer']} at {t['row_share']:.1%} of the release's rows: {t['rows']:,} of "
            f"{t['released_rows']:,}, {t['file_bytes'] / 2**30:.1f} of {t['released_file_bytes'] / 2**30:.1f} GiB as stored, "
            f"{ngram_bits}-bit rows of {t['row_bytes']} bytes (each head's table shrunk alike, the hash taken modulo it; a "
            "token still reads a row per head)")
    synthesize(out, cfg, bits, device="cuda", log=log, ngram_bits=ngram_bits)
    layout = record_layout(full, bits)
    bw = measure_bandwidths(out, layout)
    log(f"bandwidths: PCIe H2D {bw.pcie_h2d / 1e9:.1f} GB/s, HBM copy {bw.hbm_copy / 1e9:.0f} GB/s, disk {bw.disk_read / 1e9:.2f} GB/s")
    gpu_total = torch.cuda.get_device_properties(0).total_memory
    tiers = plan_tiers(full, layout, gpu_total, total_memory_bytes(), gpu_mem, host_mem, dense_bits, ngram_bits)
    log(f"tiers: GPU {tiers.gpu_fraction:.1%}, host {tiers.host_fraction:.1%}, disk {tiers.disk_fraction:.1%} ({tiers.notes})")
    k_max = max(ks)
    engine = slice_engine(out, sliced, layout, tiers, k_max, dense_bits, prefetch, ngram_bits)
    report = {"preset": preset, "layers": layers, "bits": bits, "dense_bits": dense_bits, "device": torch.cuda.get_device_name(0),
              "cuda_graphs": engine.cuda_graphs, "bandwidths": bw, "tiers": tiers, "decode": [], "prefill": []}
    if obstacle := engine.model.graph_obstacle():  # decode's launches cost host time that graphed rows do not pay
        log(f"decode runs eagerly, without CUDA graphs: {obstacle}")
    if ngram_tables:
        report["ngram_tables"], report["ngram_bits"] = ngram_tables, ngram_bits
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
                r = run_decode(engine, prompt_tokens, tokens, full.num_hidden_layers, bw)
            else:
                r = run_replayed_decode(engine, replays[k], prompt_tokens, tokens, full.num_hidden_layers, bw,
                                        shuffled=row.routing.endswith("shuffled"), warmup=warmup if row.adaptive else 0)
            report["decode"].append(r)
            log_decode(r, log)
    engine.set_top_k(k_max)
    engine.set_prefetch(False)
    engine.set_cpu_experts(0)
    for held in residency:
        place_tiers(engine, tiers, held)
        for n in prefills:
            p = run_prefill(engine, n, full.num_hidden_layers)
            report["prefill"].append(p)
            log(f"S2 prefill {n}{' resident' if held else ''}: {p['tps']:.0f} tok/s, TTFT {p['ttft_s']:.2f} s; "
                f"extrapolated {p['tps_extrapolated']:.0f} tok/s, TTFT {p['ttft_s_extrapolated']:.2f} s"
                + (f"; n-gram reads {p['ngram_reads']} ({p['ngram_bytes_read'] / 2**20:.1f} MiB)" if p["ngram_reads"] else ""))
    return report
