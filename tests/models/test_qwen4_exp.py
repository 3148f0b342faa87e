"""Qwen4-Exp beyond 16-bit parity (tests/test_parity.py): documents (EOS) in the n-gram history,
prefill in pieces and decode continuing it exactly, batched decode, the checkpoint's MTP head and
hash constants, the n-gram tables on disk (their files, row cache and counters, 8-bit rows, the damage
named), and the configs it refuses."""

import os
import shutil

import pytest
import torch

from flashmoe import kernels
from flashmoe.convert import ConversionError, convert
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.safetensors import Checkpoint, save_file
from flashmoe.models import ConfigError, args_from_dict
from flashmoe.runtime.ngram_rows import NgramTableError
from flashmoe.runtime.sampling import SamplingParams

from ..conftest import FAMILY_CONFIGS, build_hf_model
from ..test_parity import our_run, rel_err

TEXT = FAMILY_CONFIGS["qwen4_exp"]["text_config"]
EOS = TEXT["eos_token_id"]


def with_tensors(src, dst, change) -> None:
    """A copy of the checkpoint at src in dst, its tensors changed by change(tensors)."""
    with Checkpoint(src) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names()}
    change(tensors)
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())


@pytest.fixture(scope="module")
def qwen4(tmp_path_factory):
    """(reference, engine) for the tiny model, its release layout given an MTP head (skipped)."""
    d = tmp_path_factory.mktemp("qwen4")
    reference = build_hf_model("qwen4_exp", d / "hf", seed=11)
    mtp = {"mtp.fc.weight": torch.zeros(64, 128, dtype=torch.bfloat16),
           "mtp.layers.0.mlp.gate.weight": torch.zeros(8, 64, dtype=torch.bfloat16)}
    with_tensors(d / "hf", d / "mtp", lambda tensors: tensors.update(mtp))
    convert(d / "mtp", d / "q16", bits=16)
    return d, reference, Engine(d / "q16", EngineConfig(dtype="float32"))


def prompt_with_documents() -> torch.Tensor:
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(8))
    ids[[9, 10, 23]] = EOS  # an empty document, and one ending mid-block
    return ids


def test_documents_give_transformers_logits(qwen4):
    _, reference, engine = qwen4
    ids = prompt_with_documents()
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    assert rel_err(engine.forward(ids, engine.new_state(), last_only=False), expected) <= 1e-4  # measured 5e-6


def test_prefill_in_pieces_and_decode_continue_it_exactly(qwen4):
    d, _, engine = qwen4
    ids = prompt_with_documents()
    whole = engine.forward(ids, engine.new_state(), last_only=False)
    pieces = Engine(d / "q16", EngineConfig(dtype="float32", prefill_chunk=7))  # blocks of 4 straddle the pieces
    state = pieces.new_state()
    assert rel_err(pieces.forward(ids, state, last_only=False), whole) <= 1e-5
    state = engine.new_state()
    steps = torch.cat([engine.forward(ids[i : i + 1], state) for i in range(len(ids))])
    assert rel_err(steps, whole) <= 1e-5  # measured 1e-6


def test_batched_decode_is_each_sequence_alone(qwen4):
    _, _, engine = qwen4
    states = [engine.new_state() for _ in range(2)]
    engine.forward(prompt_with_documents()[:30], states[0])
    engine.forward(prompt_with_documents()[:13].flip(0), states[1])
    alone = [s.clone() for s in states]
    for token in (3, EOS, 90):
        batched = engine.forward_batch([[token], [token + 1]], states)
        single = torch.cat([engine.forward([token + i], alone[i]) for i in range(2)])
        assert rel_err(batched, single) <= 1e-6


def test_stored_hash_constants_must_be_the_configs(qwen4, tmp_path):
    d, _, _ = qwen4
    name = "model.language_model.layers.2.ple.ple_embedding.layer_multipliers"

    def change(tensors):
        tensors[name] = tensors[name] + 2

    with_tensors(d / "hf", tmp_path / "hf", change)
    with pytest.raises(ConfigError, match=r"model.layers.2.ple.ple_embedding.layer_multipliers holds .* but config.json's "
                                          "n-gram settings give"):
        convert(tmp_path / "hf", tmp_path / "out", bits=16)


class DeviceIds(torch.Tensor):
    """The step's ids as a GPU holds them: counts each read back to the host (a wait for the GPU) of
    them or of anything computed from them, but their embedding (the hidden states' own reads are
    not the ids') and what a read brought back (on the host already)."""

    HOST_READS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy, torch.Tensor.__int__,
                  torch.Tensor.__index__, torch.Tensor.__bool__, torch.Tensor.__float__}
    host_reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST_READS:
            cls.host_reads += 1
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if func in (torch.nn.functional.embedding, torch.Tensor.cpu) else out



def test_the_gpu_path_decodes_as_the_cpu_path_never_reading_its_ids_back(qwen4, monkeypatch):
    """The GPU path (its expert tier and the Triton kernels, the dense part's included; without a
    GPU on the CPU, the kernels in Triton's interpreter) against the CPU path: a prompt past QSA's
    budget (the indexer selects blocks) with documents in the n-gram history, three streams, a
    grouped prefill, then gathered decode steps. The host hashes each step's n-grams from the ids
    it fed (the prompt, the sampled token) and starts their rows' reads before the layers run:
    nothing reads the device's ids back (before, each PLE layer waited for them once a step: 8
    reads here, 2 layers in 4 steps)."""
    from flashmoe.models.transformer import Model

    pytest.importorskip("triton")
    d, _, engine = qwen4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = prompt_with_documents()[:20]  # 5 blocks of 4, of which QSA keeps 2 and the tail
    cpu_prompt, cpu_steps, cpu_tokens = our_run(engine, prompt, 3)
    if device == "cpu":
        monkeypatch.setattr(kernels, "use_kernels", lambda x: True)  # as on a GPU (tests/kernels/test_dense_path.py)
    gpu = Engine(d / "q16", EngineConfig(device=device, dtype="float32", preload=False, gpu_path_on_cpu=device == "cpu"))
    forward = Model.forward
    monkeypatch.setattr(Model, "forward", lambda self, ids, ctx: forward(self, ids.as_subclass(DeviceIds), ctx))
    monkeypatch.setattr(DeviceIds, "host_reads", 0)
    got_prompt, got_steps, got_tokens = our_run(gpu, prompt, 3)
    assert rel_err(got_prompt.cpu(), cpu_prompt) <= 1e-4 and rel_err(got_steps.cpu(), cpu_steps) <= 1e-4
    assert got_tokens == cpu_tokens
    assert gpu.gpu_tier.stats.misses > 0 and gpu.ngram_rows.stats.rows > 0
    assert DeviceIds.host_reads == 0


def test_decode_runs_eagerly_saying_why(qwen4, packed16):
    """QSA's selection and the host's n-gram reads keep this family's decode out of CUDA graphs
    (the engine turns them off on a GPU and says so, tests/test_gpu.py); the other families record."""
    _, _, engine = qwen4
    assert engine.model.graph_obstacle() == ("QSA's block selection changes shape as blocks complete, and the host reads "
                                             "the n-gram rows at every step")
    assert Engine(packed16, EngineConfig(dtype="float32")).model.graph_obstacle() is None


def test_prefetch_is_refused_naming_the_hyper_connections(qwen4):
    d, _, _ = qwen4
    with pytest.raises(ValueError, match="--prefetch guesses a layer's experts through its post-attention norm, which "
                                         "qwen4_exp's hyper-connections replace: drop --prefetch"):
        Engine(d / "q16", EngineConfig(dtype="float32", gpu_path_on_cpu=True, prefetch=True))


@pytest.mark.parametrize("change, message", [
    ({"ple_layer_ids": [1, 5]}, r"ple_layer_ids \[5\] are not layers: they count from 1 to num_hidden_layers \(4\)"),
    ({"ple_layer_ids": [2]}, r"ple_layer_ids names layer 2 \(counting from 1\), a indexed_attention layer"),
    ({"ple_embed_dim": 30}, r"ple_embed_dim \(30\) must split evenly over the n-gram heads.* = 8"),
    ({"eos_token_id": None}, "eos_token_id must be set"),
    ({"indexer_budget": None}, "the attention layers' QSA indexer needs indexer_budget"),
    ({"indexer_kv_heads": 2}, "indexer_kv_heads must be 1"),
    ({"indexer_budget": 10}, r"indexer_budget \(10\) must be a multiple of indexer_compress_ratio \(4\)"),
    ({"indexer_head_dim": 2}, r"the rotary embedding turns 4 values per head, more than indexer_head_dim \(2\)"),
    ({"indexer_compress_ratio": 0}, "indexer_compress_ratio must be greater than 0"),
    ({"hc_count": 1}, "hc_count must be 2 or more"),
    ({"output_gate_type": "gelu"}, r"output_gate_type 'gelu' is not supported \(silu or sigmoid\)"),
    ({"layer_types": ["linear_attention", "sparse_attention"] * 2}, "unknown layer types.*linear_attention / indexed_attention"),
])
def test_configs_it_cannot_run_are_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        args_from_dict({"model_type": "qwen4_exp", "text_config": {**TEXT, **change}})


def test_release_names_for_indexed_layers_and_defaults():
    released = {**TEXT, "layer_types": ["linear_attention", "full_attention"] * 2, "ple_embed_dim": None}
    args = args_from_dict({"model_type": "qwen4_exp", "text_config": released})
    assert [args.layer(i).mixer for i in range(4)] == ["linear_attention", "attention"] * 2
    assert args.ple_dim == 64 and args.layer(0).ple.index == 0 and args.layer(2).ple.index == 1
    assert args.attention().indexer.top_blocks == 2


def test_the_ngram_tables_live_on_disk_not_in_the_dense_weights(qwen4):
    d, _, engine = qwen4
    with Checkpoint(d / "q16") as dense:
        assert not [name for name in dense.names() if "ngram_embedding" in name]
    tables = engine.manifest.ngram_files
    assert [t.layer for t in tables] == [0, 2] and all((d / "q16" / t.file).is_file() for t in tables)
    resident = {name for name, _ in engine.model.named_parameters()} | {name for name, _ in engine.model.named_buffers()}
    assert not [name for name in resident if "ngram" in name]
    assert engine.ngram_rows.cached_bytes <= engine.manifest.total_ngram_bytes  # rows as read, never a whole table


def test_the_row_cache_stays_within_its_budget_and_reads_count_per_token(qwen4):
    d, _, engine = qwen4
    ids = prompt_with_documents()
    expected = engine.forward(ids, engine.new_state(), last_only=False)
    small = Engine(d / "q16", EngineConfig(dtype="float32", ngram_mem=10 * 8))  # ten 8-byte rows
    store = small.ngram_rows
    assert store.capacity == 10 and store.pool.numel() <= 80
    state = small.new_state()
    assert rel_err(small.forward(ids, state, last_only=False), expected) <= 1e-6  # the same rows (sums may round otherwise)
    assert len(store.slots) <= store.capacity
    gen = small.generate(ids[:5].tolist(), SamplingParams(max_tokens=4, temperature=0))
    list(gen)
    stats = gen.stats.ngrams
    # two PLE layers, 8 heads each: 16 rows a token, on whole 4 KiB blocks (512 of these rows each)
    assert stats.rows == 16 * gen.stats.decode_tokens and stats.bytes_read == 4096 * stats.reads
    assert 0 < stats.reads <= 4 * gen.stats.decode_tokens and len(store.slots) <= store.capacity
    small.close()


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.unlink(), r"n-gram table file .*layer_000.bin \(layer 0's n-gram embeddings\) is missing; re-run flashmoe convert"),
    (lambda path: os.truncate(path, 4096), r"n-gram table file .*layer_000.bin has 4096 bytes but layer 0's table needs 8200 \(2 blocks of 4096, each 512 rows of 4 bfloat16 values, and their CRC-32s\): the file is truncated"),
])
def test_a_missing_or_truncated_table_file_is_named(qwen4, tmp_path, damage, message):
    d, _, _ = qwen4
    shutil.copytree(d / "q16", tmp_path / "model")
    damage(tmp_path / "model" / "ngrams" / "layer_000.bin")
    with pytest.raises(NgramTableError, match=message):
        Engine(tmp_path / "model", EngineConfig(dtype="float32"))


def test_8bit_ngram_rows_stay_within_their_measured_error(tmp_path):
    """Rows of the release's width (160 values) as int8 codes and a scale per row, against the same
    model's 16-bit rows: the table within 0.66% (relative, as the conversion reports it); this
    prompt's logits within 4% and their argmax the same at 38 of its 40 positions or more (measured
    on eight seeds: 0.7-3.0%, 38-40 agreeing; this one 1.7%, 39). These tiny random models amplify:
    their n-gram term moves the logits by half their norm or more; greedy decoding agreed over 8
    tokens on six seeds of eight. The file is half the 16-bit one's size; one cut short is named."""
    build_hf_model("qwen4_exp", tmp_path / "hf", seed=12, text_config={**TEXT, "ple_embed_dim": 1280})
    sixteen = convert(tmp_path / "hf", tmp_path / "q16", bits=16)
    eight = convert(tmp_path / "hf", tmp_path / "q8", bits=16, ngram_bits=8)
    assert 0.006 <= eight.relative_errors()["ngrams"] <= 0.0070 and sixteen.relative_errors()["ngrams"] == 0
    engines = [Engine(tmp_path / name, EngineConfig(dtype="float32")) for name in ("q16", "q8")]
    assert {(t.dtype, t.row_bytes, t.rows_per_block) for t in engines[1].manifest.ngram_files} == {("int8", 164, 24)}
    assert eight.ngram_bytes < 0.51 * sixteen.ngram_bytes
    ids = prompt_with_documents()
    expected, got = (engine.forward(ids, engine.new_state(), last_only=False) for engine in engines)
    assert rel_err(got, expected) <= 0.04 and (got.argmax(-1) == expected.argmax(-1)).sum() >= 38
    (table,) = [t for t in engines[1].manifest.ngram_files if t.layer == 0]
    os.truncate(tmp_path / "q8" / table.file, table.file_size - 4)
    with pytest.raises(NgramTableError, match=rf"layer 0's table needs {table.file_size} \({table.blocks} blocks of 4096, "
                                              r"each 24 rows of 160 int8 codes and a float32 scale, and their CRC-32s\)"):
        Engine(tmp_path / "q8", EngineConfig(dtype="float32"))


def test_ngram_bits_other_than_16_or_8_are_refused_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match=r"--ngram-bits must be 16 .* or 8 .*, not 4"):
        convert(tmp_path / "absent", tmp_path / "out", ngram_bits=4)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_table_block_fails_its_checksum(qwen4, tmp_path):
    d, _, _ = qwen4
    shutil.copytree(d / "q16", tmp_path / "model")
    with open(tmp_path / "model" / "ngrams" / "layer_002.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    engine = Engine(tmp_path / "model", EngineConfig(dtype="float32"))
    with pytest.raises(NgramTableError, match=r"n-gram table block 0 in .*layer_002.bin failed its checksum"):
        engine.forward(prompt_with_documents(), engine.new_state())


def test_a_missing_table_block_in_the_checkpoint_is_named(qwen4, tmp_path):
    d, _, _ = qwen4
    name = "model.language_model.layers.2.ple.ple_embedding.ngram_embedding.shard_3.weight"
    with_tensors(d / "hf", tmp_path / "hf", lambda tensors: tensors.pop(name))
    with pytest.raises(ConversionError, match=r"model.layers.2.ple.ple_embedding.ngram_embedding.shard_3.weight is missing"):
        convert(tmp_path / "hf", tmp_path / "out", bits=16)


def test_the_sigmoid_output_gate_gives_transformers_logits(tmp_path):
    """The released config's output_gate_type: DeltaNet's output norm gated by sigmoid(z), not silu(z)."""
    from ..test_parity import check_parity

    reference = build_hf_model("qwen4_exp", tmp_path / "hf", seed=12,
                               text_config={**TEXT, "output_gate_type": "sigmoid"})
    engine, _ = check_parity(tmp_path / "hf", reference, tmp_path)
    assert {layer.linear_attn.norm.gate for layer in engine.model.layers if layer.is_linear} == {"sigmoid"}

