import json

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from flashmoe.config import ModelConfig, UnsupportedModelError

from .hostile_json import FUZZ, JSON_VALUES, mutated

BASE = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
)


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="qwen3_5_moe.*qwen3_next"):
        ModelConfig.from_dict({**BASE, "model_type": "llama"})


def test_composite_vlm_config_reads_text_config_and_top_level_tie():
    cfg = ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": BASE, "tie_word_embeddings": True})
    assert cfg.model_type == "qwen3_5_moe" and cfg.tie_word_embeddings and cfg.hidden_size == 64


def test_full_attention_interval_and_rope_parameters():
    raw = {**BASE, "model_type": "qwen3_5_moe_text", "full_attention_interval": 4, "head_dim": 256,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}}
    cfg = ModelConfig.from_dict(raw, {"eos_token_id": [7, 9]})
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    assert cfg.rope_theta == 1e7 and cfg.rotary_dim == 64 and cfg.eos_token_ids == [7, 9]


def test_legacy_top_level_rope_keys():
    cfg = ModelConfig.from_dict({**BASE, "model_type": "qwen3_next", "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    assert cfg.rope_theta == 5e6 and cfg.partial_rotary_factor == 0.5


def test_qwen3_next_dense_layers():
    cfg = ModelConfig.from_dict({**BASE, "model_type": "qwen3_next", "mlp_only_layers": [0], "decoder_sparse_step": 2})
    assert cfg.moe_layers == [1, 3, 5, 7]


def test_unsupported_rope_and_missing_keys_are_clear():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict({**BASE, "model_type": "qwen3_next", "rope_parameters": {"rope_type": "yarn"}})
    raw = {k: v for k, v in BASE.items() if k != "num_experts"}
    with pytest.raises(ValueError, match="num_experts"):
        ModelConfig.from_dict({**raw, "model_type": "qwen3_next"})


def test_from_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "qwen3_next"}))
    assert ModelConfig.from_dir(tmp_path).num_experts == 8


def test_wrong_types_and_impossible_sizes_are_refused_naming_the_key():
    cases = {
        "hidden_size must be an integer, not '64'": {"hidden_size": "64"},
        "num_hidden_layers must be an integer, not 8.0": {"num_hidden_layers": 8.0},
        "tie_word_embeddings must be true or false, not 'false'": {"tie_word_embeddings": "false"},
        "num_attention_heads must be greater than 0, not 0": {"num_attention_heads": 0, "head_dim": 16},
        "decoder_sparse_step must be greater than 0": {"decoder_sparse_step": 0},
        "full_attention_interval must be at least 1": {"full_attention_interval": 0},
        "num_experts_per_tok 9 is more than num_experts 8": {"num_experts_per_tok": 9},
        "rms_norm_eps must be a finite number, not nan": {"rms_norm_eps": float("nan")},
        "rope_parameters must be an object": {"rope_parameters": [1]},
        "num_hidden_layers 1000000000000 is more than any model has": {"num_hidden_layers": 10**12},  # was a 10**12 list
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict({**BASE, "model_type": "qwen3_next", **change})
    with pytest.raises(ValueError, match="must hold a JSON object, not list"):
        ModelConfig.from_dict([BASE])
    with pytest.raises(ValueError, match="text_config must be an object"):
        ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": "x"})


def test_a_config_that_is_not_json_is_reported_naming_the_file_and_the_position(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_next",\n "vocab_size": }')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON: Expecting value at line 2 column 16"):
        ModelConfig.from_dir(tmp_path)


@FUZZ
@given(raw=mutated({**BASE, "model_type": "qwen3_next", "rope_parameters": {"rope_type": "default"}, "eos_token_id": [1]})
       | JSON_VALUES, generation=st.none() | mutated({"eos_token_id": [1, 2]}))
def test_a_fuzzed_config_is_read_or_refused_with_a_value_error(raw, generation):
    try:
        cfg = ModelConfig.from_dict(raw, generation)
    except ValueError as e:  # UnsupportedModelError is one; never a KeyError, TypeError or ZeroDivisionError
        assert "\n" not in str(e)
        event("refused")
        return
    event("read")
    assert cfg.moe_layers and 1 <= cfg.num_experts_per_tok <= cfg.num_experts
