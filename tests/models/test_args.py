"""Each family's arguments from config.json: keys as released, defaults as transformers', clear
errors for what cannot be built."""

import json
import math

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from flashmoe.models import FAMILIES, ConfigError, UnsupportedModelError, args_from_dict, read_args
from flashmoe.moe.block import MoESpec

from ..hostile_json import FUZZ, JSON_VALUES, mutated

BASE = dict(
    vocab_size=100, hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
)


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="glm4_moe, gpt_oss, minimax_m2, qwen3_5_moe.*qwen3_moe, qwen3_next"):
        args_from_dict({**BASE, "model_type": "llama"})
    assert set(FAMILIES) >= {"qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "qwen3_moe", "minimax_m2", "glm4_moe", "gpt_oss"}


def test_composite_vlm_config_reads_text_config_and_top_level_tie():
    args = args_from_dict({"model_type": "qwen3_5_moe", "text_config": BASE, "tie_word_embeddings": True})
    assert args.tie_word_embeddings and args.hidden_size == 64


def test_full_attention_interval_and_rope_parameters():
    raw = {**BASE, "model_type": "qwen3_5_moe_text", "full_attention_interval": 4, "head_dim": 256,
           "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}}
    args = args_from_dict(raw, {"eos_token_id": [7, 9]})
    assert [args.layer(i).mixer for i in range(8)] == (["linear_attention"] * 3 + ["attention"]) * 2
    assert args.rotary() == (64, 1e7) and args.eos_token_ids == [7, 9]


def test_legacy_top_level_rope_keys():
    args = args_from_dict({**BASE, "model_type": "qwen3_next", "rope_theta": 5e6, "partial_rotary_factor": 0.5, "head_dim": 16})
    assert args.rotary() == (8, 5e6)


def test_dense_layers_where_the_config_says():
    assert args_from_dict({**BASE, "model_type": "qwen3_next", "mlp_only_layers": [0], "decoder_sparse_step": 2}).moe_layers == [1, 3, 5, 7]
    qwen3 = {**BASE, "model_type": "qwen3_moe", "mlp_only_layers": [2]}
    assert args_from_dict(qwen3).moe_layers == [0, 1, 3, 4, 5, 6, 7]
    glm = {**BASE, "model_type": "glm4_moe", "n_routed_experts": 8, "first_k_dense_replace": 3}
    assert args_from_dict(glm).moe_layers == [3, 4, 5, 6, 7]


def test_each_family_reads_its_own_keys():
    minimax = args_from_dict({**BASE, "model_type": "minimax_m2", "num_local_experts": 16, "intermediate_size": 24,
                              "head_dim": 16, "rotary_dim": 8})
    moe = minimax.moe
    assert (moe.num_experts, moe.intermediate, moe.routing.scoring, moe.shared_intermediate) == (16, 24, "sigmoid", 0)
    assert minimax.rotary() == (8, 5e6) and minimax.attention().qk_norm == "all"
    glm = args_from_dict({**BASE, "model_type": "glm4_moe", "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                          "routed_scaling_factor": 2.5, "n_shared_experts": 2, "head_dim": 16, "attention_bias": True})
    moe = glm.layer(5).mlp
    assert isinstance(moe, MoESpec) and moe.shared_intermediate == 64 and moe.router_fp32 and not moe.shared_gate
    assert (moe.routing.n_group, moe.routing.topk_group, moe.routing.scaling) == (4, 2, 2.5)
    assert glm.rotary() == (8, 10000.0) and glm.attention().qkv_bias and not glm.attention().o_bias
    assert glm.rms_norm_eps == 1e-5  # transformers' default for the family
    qwen3 = args_from_dict({**BASE, "model_type": "qwen3_moe", "num_local_experts": 4})  # as transformers saves it
    assert qwen3.moe.num_experts == 8 and not qwen3.moe.routing.norm_topk  # num_experts first; norm off by default


def test_gpt_oss_reads_windows_sinks_yarn_and_its_expert_variant():
    raw = {**BASE, "model_type": "gpt_oss", "num_local_experts": 16, "intermediate_size": 24, "head_dim": 16,
           "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                               "rope_theta": 150000.0, "truncate": False}}
    args = args_from_dict(raw)
    assert [args.layer(i).window for i in range(4)] == [128, None, 128, None]  # sliding first, as transformers
    moe = args.moe
    assert moe.router_bias and moe.expert_bias and (moe.act.alpha, moe.act.limit) == (1.702, 7.0)
    assert args.attention().sinks and args.attention().qkv_bias and args.attention().o_bias
    yarn = args.yarn()
    assert (yarn.factor, yarn.original_max_positions, yarn.truncate) == (32.0, 4096, False)
    assert yarn.scale == pytest.approx(0.1 * math.log(32) + 1)
    custom = args_from_dict({**raw, "layer_types": ["full_attention"] * 7 + ["sliding_attention"], "sliding_window": 64})
    assert [custom.layer(i).window for i in range(8)] == [None] * 7 + [64]
    with pytest.raises(ConfigError, match="layer_types must name 8 layers"):
        args_from_dict({**raw, "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(ConfigError, match="layer_types must name 8 layers.*one of sliding_attention, full_attention"):
        args_from_dict({**raw, "layer_types": ["chunked_attention"] * 8})
    with pytest.raises(ConfigError, match="yarn rope needs original_max_position_embeddings"):
        args_from_dict({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 32.0}})
    with pytest.raises(ConfigError, match="yarn rope's beta_fast must be a number above 0"):
        args_from_dict({**raw, "rope_parameters": {**raw["rope_parameters"], "beta_fast": "fast"}})
    with pytest.raises(ConfigError, match="sliding_window must be greater than 0"):
        args_from_dict({**raw, "sliding_window": 0})


def test_unsupported_values_and_missing_keys_are_named():
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
        args_from_dict({**BASE, "model_type": "qwen3_next", "rope_parameters": {"rope_type": "longrope"}})
    raw = {k: v for k, v in BASE.items() if k != "num_experts"}
    with pytest.raises(ConfigError, match="missing the key 'num_experts'"):
        args_from_dict({**raw, "model_type": "qwen3_next"})
    with pytest.raises(ConfigError, match="missing the key 'num_experts'"):
        args_from_dict({**raw, "model_type": "qwen3_moe"})
    with pytest.raises(ConfigError, match="missing the key 'n_routed_experts'"):
        args_from_dict({**BASE, "model_type": "glm4_moe"})
    with pytest.raises(ConfigError, match="sliding"):
        args_from_dict({**BASE, "model_type": "qwen3_moe", "use_sliding_window": True})
    with pytest.raises(ValueError, match="equal groups"):
        args_from_dict({**BASE, "model_type": "glm4_moe", "n_routed_experts": 8, "n_group": 3})


def test_read_args_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_args(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_next",')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON: .* line 1 column"):
        read_args(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        read_args(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "qwen3_next"}))
    assert read_args(tmp_path).moe.num_experts == 8


def test_wrong_types_and_impossible_sizes_are_refused_naming_the_key():
    cases = {
        "hidden_size must be an integer, not '64'": {"hidden_size": "64"},
        "num_hidden_layers must be an integer, not 8.0": {"num_hidden_layers": 8.0},
        "tie_word_embeddings must be true or false, not 'false'": {"tie_word_embeddings": "false"},
        "num_attention_heads must be greater than 0, not 0": {"num_attention_heads": 0, "head_dim": 16},
        "decoder_sparse_step must be greater than 0": {"decoder_sparse_step": 0},
        "full_attention_interval must be greater than 0": {"full_attention_interval": 0},
        "k = 9 experts cannot be chosen": {"num_experts_per_tok": 9},
        "rms_norm_eps must be a finite number, not nan": {"rms_norm_eps": float("nan")},
        "rope_parameters must be an object": {"rope_parameters": [1]},
        "num_hidden_layers 1000000000000 is more than any model has": {"num_hidden_layers": 10**12},  # was a 10**12 list
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            args_from_dict({**BASE, "model_type": "qwen3_next", **change})
    with pytest.raises(ValueError, match="must hold a JSON object, not list"):
        args_from_dict([BASE])
    with pytest.raises(ValueError, match="text_config must be an object"):
        args_from_dict({"model_type": "qwen3_5_moe", "text_config": "x"})


def test_a_config_that_is_not_json_is_reported_naming_the_file_and_the_position(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_next",\n "vocab_size": }')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON: Expecting value at line 2 column 16"):
        read_args(tmp_path)


@FUZZ
@given(raw=mutated({**BASE, "model_type": "qwen3_next", "rope_parameters": {"rope_type": "default"}, "eos_token_id": [1]})
       | mutated({**BASE, "model_type": "glm4_moe", "n_routed_experts": 8, "n_group": 2, "topk_group": 1})
       | JSON_VALUES, generation=st.none() | mutated({"eos_token_id": [1, 2]}))
def test_a_fuzzed_config_is_read_or_refused_with_a_value_error(raw, generation):
    try:
        args = args_from_dict(raw, generation)
    except ValueError as e:  # ConfigError and UnsupportedModelError are ones; never a KeyError, TypeError or ZeroDivisionError
        assert "\n" not in str(e)
        event("refused")
        return
    event("read")
    assert args.moe_layers and 1 <= args.moe.top_k <= args.moe.num_experts
