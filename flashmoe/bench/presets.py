"""The model shapes `flashmoe bench` synthesizes: each preset is the config.json of a released model
(values from the authors' published configs), read by its family like any checkpoint's config."""

from __future__ import annotations

from ..models import ModelArgs, args_from_dict

_QWEN35 = dict(
    model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=4096, num_hidden_layers=60,
    num_attention_heads=32, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
    linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
    num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
    rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=False, eos_token_id=248046,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)
_QWEN3 = dict(
    model_type="qwen3_moe", vocab_size=151936, head_dim=128, norm_topk_prob=True, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=40960, eos_token_id=151645,
)
# Published config.json values (docs/BENCHMARKS.md names the sources).
PRESETS: dict[str, dict] = {
    "qwen3.5-397b-a17b": _QWEN35,
    "qwen3.5-122b-a10b": {**_QWEN35, "hidden_size": 3072, "num_hidden_layers": 48, "num_experts": 256,
                          "num_experts_per_tok": 8},
    "qwen3.6-35b-a3b": {**_QWEN35, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
                        "linear_num_value_heads": 32, "num_experts": 256, "num_experts_per_tok": 8,
                        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
    "qwen3-next-80b-a3b": {
        **_QWEN35, "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 16, "linear_num_value_heads": 32, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "intermediate_size": 5120,
        "eos_token_id": 151645,  # its own vocabulary's <|im_end|>, not Qwen3.5's 248046
    },
    "qwen3-30b-a3b": {**_QWEN3, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_experts": 128, "num_experts_per_tok": 8},
    "qwen3-235b-a22b": {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
                        "num_key_value_heads": 4, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                        "num_experts": 128, "num_experts_per_tok": 8},
    "qwen3-coder-480b-a35b": {**_QWEN3, "hidden_size": 6144, "num_hidden_layers": 62, "num_attention_heads": 96,
                              "num_key_value_heads": 8, "intermediate_size": 8192, "moe_intermediate_size": 2560,
                              "num_experts": 160, "num_experts_per_tok": 8, "rope_theta": 1e7,
                              "max_position_embeddings": 262144},
    "minimax-m2": dict(
        model_type="minimax_m2", vocab_size=200064, hidden_size=3072, num_hidden_layers=62, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8,
        rotary_dim=64, rope_theta=5e6, rms_norm_eps=1e-6, max_position_embeddings=196608, tie_word_embeddings=False,
    ),
    "glm-4.5": dict(
        model_type="glm4_moe", vocab_size=151552, hidden_size=5120, num_hidden_layers=92, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160,
        num_experts_per_tok=8, n_shared_experts=1, norm_topk_prob=True, first_k_dense_replace=3, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
        rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
        eos_token_id=[151329, 151336, 151338],
    ),
}
# Qwen3.8-Flash-Next (Qwen4-Exp's text model), the text_config of Qwen/Qwen3.8-Flash-Next-FP8 as
# transcribed in several public inference projects' test fixtures (an SGLang patch test, a Go and a
# Rust config parser: the same values in each); 2560 hidden, 48 layers, 512 experts of 640, one PLE
# layer (2, counted from 1) with 3-gram tables of 20M-row heads. Qwen's own model card was not in
# the search corpus. Left out: output_gate_type "sigmoid" (it changes no shape; the released
# checkpoint's config carries it), the MTP layer (not run) and mrope (text positions only).
PRESETS["qwen3.8-flash-next"] = dict(
    model_type="qwen4_exp_text", vocab_size=248320, hidden_size=2560, num_hidden_layers=48, num_attention_heads=24,
    num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10,
    moe_intermediate_size=640, shared_expert_intermediate_size=640, norm_topk_prob=True, rms_norm_eps=1e-6,
    max_position_embeddings=262144, tie_word_embeddings=False, eos_token_id=248044,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    hc_count=4, hc_lowrank=320, ple_layer_ids=[2], ple_embed_dim=2560, ple_conv_kernel_size=4, ngram_size=3,
    heads_per_ngram=8, ngram_vocab_size_base=20_000_000, make_ngram_vocab_size_divisible_by=128, seed=1234,
    split_ngram_parts=128, indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=128, indexer_budget=2048,
    indexer_compress_ratio=4,
)
_GPT_OSS = dict(
    model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
    num_key_value_heads=8, head_dim=64, num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0,
    rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=True,
    eos_token_id=200002, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                          "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
)
PRESETS["gpt-oss-120b"] = {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128}
PRESETS["gpt-oss-20b"] = {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32}


def preset_config(name: str, layers: int | None = None) -> dict:
    """The preset's config.json, or that of a slice of its first `layers` layers."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[name])
    full = cfg["num_hidden_layers"]
    if "linear_num_key_heads" in cfg:  # the hybrid families: every 4th layer full attention, written out
        cfg["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(full)]
    if layers:
        if not 1 <= layers <= full:
            raise ValueError(f"--layers must be between 1 and {full} for {name}, got {layers}")
        cfg["num_hidden_layers"] = layers
        if "layer_types" in cfg:
            cfg["layer_types"] = cfg["layer_types"][:layers]
        if "ple_layer_ids" in cfg:  # one-indexed; a PLE layer keeps its place (and its tables) among those left
            cfg["ple_layer_ids"] = [i for i in cfg["ple_layer_ids"] if i <= layers]
    return cfg


# The release's n-gram table (Qwen3.8-Flash-Next: 320M rows for its one PLE layer, 95 GiB of values,
# 102 GiB as stored) cannot fit the bench machines' 64 GB disks: bench synthesizes every head's table
# at an eighth of its rows (12.7 GiB as stored; an 8-layer slice adds 10.5 GiB of 4-bit experts and
# 3.6 GiB of dense weights). Per token the engine still reads one row, one 4 KiB block, per head;
# only the share of the table a row cache of a given size holds changes, and the slice's row cache
# is scaled with the table (tiers.py) so that share is the full model's.
NGRAM_TABLE_DIVISOR = 8


def shrink_ngram_tables(cfg: dict, divisor: int = NGRAM_TABLE_DIVISOR) -> dict:
    """cfg with each n-gram head's table 1/divisor of its rows: the base of the heads' table sizes
    divided, so the heads' tables are the primes from there on, and the hash is taken modulo them
    (the model reads every row it hashes to; docs/BENCHMARKS.md). Configs without tables unchanged."""
    if not cfg.get("ple_layer_ids"):
        return cfg
    return {**cfg, "ngram_vocab_size_base": cfg["ngram_vocab_size_base"] // divisor}


def preset_args(name: str, layers: int | None = None) -> ModelArgs:
    return args_from_dict(preset_config(name, layers))
