"""Qwen4-Exp beyond 16-bit parity (tests/test_parity.py): documents (EOS) in the n-gram history,
prefill in pieces and decode continuing it exactly, batched decode, the checkpoint's MTP head and
hash constants, and the configs it refuses."""

import pytest
import torch

from flashmoe.convert import convert
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.safetensors import Checkpoint, save_file
from flashmoe.models import ConfigError, args_from_dict

from ..conftest import FAMILY_CONFIGS, build_hf_model
from ..test_parity import rel_err

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


def test_the_gpu_path_is_refused(qwen4):
    d, _, _ = qwen4
    with pytest.raises(ValueError, match="qwen4_exp runs on the CPU path only for now: use --device cpu"):
        Engine(d / "q16", EngineConfig(gpu_path_on_cpu=True))


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
    ({"output_gate_type": "sigmoid"}, "output_gate_type 'sigmoid' is not supported"),
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
