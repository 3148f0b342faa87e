"""Bench on Qwen3.8-Flash-Next's shape (qwen4_exp) on the CPU: a tiny slice synthesized with its
n-gram table in the converter's format, which the CPU engine loads and decodes; the tables in the
full model's footprint; the bench's scenarios on the GPU path."""

import functools
import json

import pytest
import torch

from flashmoe.bench import presets, run
from flashmoe.bench.presets import PRESETS, preset_args, preset_config, shrink_ngram_tables
from flashmoe.bench.probes import Bandwidths
from flashmoe.bench.scenarios import run_decode, run_prefill
from flashmoe.bench.synthesis import ngram_table_files, ngram_tables_report, record_layout, synthesize
from flashmoe.bench.tiers import plan_tiers, slice_engine
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest, RecordLayout
from flashmoe.models import args_from_dict
from flashmoe.runtime.ngram_rows import NgramRowStore

# The preset shrunk as tests/bench/test_bench.py shrinks the 397B's; PLE before layer 2 (counted
# from 1) as released, 4 heads of rows of 8 values (256 to a block), ~4.1k rows: 17 blocks.
TINY_QWEN4 = dict(
    PRESETS["qwen3.8-flash-next"], vocab_size=1024, hidden_size=64, num_attention_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    num_hidden_layers=4, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=64, hc_lowrank=8, ple_embed_dim=32, heads_per_ngram=2, ngram_vocab_size_base=1000,
    make_ngram_vocab_size_divisible_by=16, eos_token_id=1023, indexer_n_heads=2, indexer_head_dim=16,
    indexer_budget=8, indexer_compress_ratio=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)


@pytest.fixture(scope="module")
def tiny_qwen4(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("bench") / "q4", TINY_QWEN4, bits=4, log=lambda _: None)


def test_the_synthesized_tables_are_the_converters_format(tiny_qwen4):
    """One file for the PLE layer, in the manifest, of the shape config.json gives; every block
    passes the reader's CRC-32 check; the rows are unit-variance values, the padding zeros."""
    (table,) = Manifest.load(tiny_qwen4).ngram_files
    assert table == ngram_table_files(args_from_dict(TINY_QWEN4))[0]
    assert (table.layer, table.file, table.width, table.dtype) == (1, "ngrams/layer_001.bin", 8, "bfloat16")
    assert table.blocks > 1 and table.rows % table.rows_per_block  # a padded last block
    assert (tiny_qwen4 / table.file).stat().st_size == table.file_size
    store = NgramRowStore(tiny_qwen4, (table,), budget_bytes=0)  # checks the size; verifies each block's CRC-32 as read
    try:
        rows = store.fetch(1, torch.arange(table.rows)).result()
        assert store.stats.reads == table.blocks
    finally:
        store.close()
    assert rows.shape == (table.rows, 8) and 0.9 < float(rows.float().std()) < 1.1
    blocks = (tiny_qwen4 / table.file).read_bytes()[: table.crc_offset]
    last = blocks[(table.blocks - 1) * table.block_bytes :]
    assert not any(last[(table.rows % table.rows_per_block) * table.row_bytes :])


def test_the_cpu_engine_decodes_the_slice_reading_its_table(tiny_qwen4):
    """The scenarios' rows report what the n-gram reads cost, on any engine that makes them."""
    engine = Engine(tiny_qwen4, EngineConfig(device="cpu", dtype="float32", ngram_mem=0, threads=1))
    assert torch.isfinite(engine.forward(torch.arange(20), engine.new_state(), last_only=False)).all()
    r = run_decode(engine, 8, 4, layers_full=48, bw=Bandwidths(1e10, 1e11, 1e9), repeats=1)
    assert r.tokens == 3 and r.tps > 0
    assert r.ngram_rows_per_token == 4 and r.ngram_hit_rate == 0  # a row per head, no cache
    assert 1 <= r.ngram_reads_per_token <= 4  # a block each, unless two rows share one
    assert r.ngram_bytes_per_token == r.ngram_reads_per_token * 4096
    p = run_prefill(engine, 12, layers_full=48)
    assert p["ngram_reads"] > 0 and p["ngram_bytes_read"] == 4096 * p["ngram_reads"]


def test_the_full_models_footprint_counts_its_tables():
    """Qwen3.8-Flash-Next's table: 102 GiB on disk (51 GiB in 8-bit rows); its row cache the
    engine's sixteenth of the host tier, the experts' host tier the rest."""
    full = preset_args("qwen3.8-flash-next")
    layout = RecordLayout.build(2560, 640, 4, 64)
    host = 32 << 30
    tiers = plan_tiers(full, layout, 80 << 30, 128 << 30, gpu_mem=0, host_mem=host)
    assert tiers.ngram_table_bytes / 2**30 == pytest.approx(101.8, abs=0.1)
    assert tiers.ngram_cache_bytes == host // 16
    assert tiers.ngram_cache_share == pytest.approx(tiers.ngram_cache_bytes / (320_001_536 * 320))
    per_expert = len(full.moe_layers) * layout.record_size
    assert tiers.host_per_layer == (host - host // 16) // per_expert
    assert "n-gram tables 101.8 GiB on disk, their row cache 2.0 GiB of the host tier" in tiers.notes
    eight = plan_tiers(full, layout, 80 << 30, 128 << 30, gpu_mem=0, host_mem=host, ngram_bits=8)
    assert eight.ngram_table_bytes / 2**30 == pytest.approx(50.9, abs=0.1)
    assert eight.ngram_cache_share == pytest.approx(tiers.ngram_cache_share * 320 / 164)  # the same RAM holds more rows


def test_bench_synthesizes_8bit_rows_the_store_reads_back(tmp_path):
    """At --ngram-bits 8 the table is int8 codes and a scale per row, in the converter's format:
    every block passes its CRC-32 check and the rows read back unit-variance values."""
    out = synthesize(tmp_path / "q4", TINY_QWEN4, bits=4, log=lambda _: None, ngram_bits=8)
    (table,) = Manifest.load(out).ngram_files
    assert table == ngram_table_files(args_from_dict(TINY_QWEN4), 8)[0] and (table.dtype, table.row_bytes) == ("int8", 12)
    store = NgramRowStore(out, (table,), budget_bytes=0)
    try:
        rows = store.fetch(1, torch.arange(table.rows)).result()
    finally:
        store.close()
    assert rows.shape == (table.rows, 8) and rows.dtype == torch.float32 and 0.9 < float(rows.std()) < 1.1


def test_bench_synthesizes_an_eighth_of_the_released_table_and_says_so():
    full = preset_args("qwen3.8-flash-next")
    (table,) = ngram_tables_report(full, args_from_dict(shrink_ngram_tables(preset_config("qwen3.8-flash-next", 8))))
    assert table["layer"] == 1 and table["released_rows"] == 320_001_536
    assert table["row_share"] == pytest.approx(1 / 8, rel=1e-3) and table["file_bytes"] / 2**30 == pytest.approx(12.7, abs=0.1)
    assert shrink_ngram_tables(preset_config("qwen3-30b-a3b", 8)) == preset_config("qwen3-30b-a3b", 8)
    assert preset_config("qwen3.8-flash-next", 1)["ple_layer_ids"] == []  # a slice before the PLE layer has no table
    assert ngram_tables_report(full, preset_args("qwen3.8-flash-next", 1)) == []


def test_bench_runs_the_scenarios_on_the_gpu_path(tmp_path, monkeypatch):
    """bench on this family synthesizes (stating the table's share), plans, and runs S1 and S2 on
    the GPU path: here its logic on the CPU, the kernels in Triton's interpreter, one repeat."""
    pytest.importorskip("triton")
    monkeypatch.setitem(PRESETS, "tiny-qwen4", {k: v for k, v in TINY_QWEN4.items() if k != "layer_types"})
    monkeypatch.setattr("flashmoe.bench.synthesize", lambda *a, **kw: synthesize(*a, **{**kw, "device": "cpu"}))
    monkeypatch.setattr("flashmoe.bench.measure_bandwidths", lambda out, layout: Bandwidths(1e10, 1e11, 1e9))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("Props", (), {"total_memory": 1 << 30}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "the CPU")
    # the engine slice_engine builds, on the GPU path's logic (page-cache reads: tmp_path may refuse O_DIRECT)
    monkeypatch.setattr("flashmoe.bench.tiers.EngineConfig", lambda **kw: EngineConfig(
        **{**kw, "device": "cpu", "dtype": "float32", "gpu_path_on_cpu": True, "direct_io": False}))
    monkeypatch.setattr("flashmoe.bench.run_decode", functools.partial(run_decode, repeats=1))
    lines = []
    report = run("tiny-qwen4", 2, 4, [1], 4, 4, [9], tmp_path, log=lines.append)
    assert any(line.startswith("n-gram table of layer 1 at 13.4% of the release's rows: 544 of 4,064")
               and "8-bit rows of 12 bytes" in line for line in lines)
    assert "decode runs eagerly, without CUDA graphs: the host reads the n-gram rows at every step" in lines
    stamp = json.loads((tmp_path / "tiny-qwen4-L2-4bit-ngram8" / "bench.json").read_text())
    assert stamp["bench_config"]["ngram_vocab_size_base"] == 1000 // presets.NGRAM_TABLE_DIVISOR
    assert stamp["ngram_bits"] == report["ngram_bits"] == 8  # 4-bit experts: the converter's default rows
    (decode,) = report["decode"]
    assert decode.tokens == 3 and decode.tps > 0 and decode.ngram_rows_per_token == 4  # a row per head
    assert decode.bytes_per_token["pcie"] > 0  # experts copied into the GPU tier's slots
    (prefill,) = report["prefill"]
    assert prefill["prompt_tokens"] == 9 and prefill["ngram_reads"] > 0  # 9 tokens: the grouped kernels


def test_slice_engine_keeps_the_row_cache_out_of_the_expert_budget(tiny_qwen4, monkeypatch):
    made = {}
    monkeypatch.setattr("flashmoe.engine.Engine", lambda model, config: made.update(config=config) or "engine")
    args = args_from_dict(TINY_QWEN4)
    layout = record_layout(args, 4)
    tiers = plan_tiers(args, layout, 1 << 30, 1 << 30, gpu_mem=5 * 4 * layout.record_size, host_mem=64 << 20)
    slice_engine(tiny_qwen4, args, layout, tiers, k_max=2)
    (table,) = ngram_table_files(args)
    c = made["config"]
    assert c.ngram_mem == int(tiers.ngram_cache_share * table.rows * table.row_bytes) > 0
    assert c.host_mem - c.ngram_mem == (tiers.host_per_layer * 4 + 2) * layout.record_size
