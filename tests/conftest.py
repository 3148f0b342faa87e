"""Tiny random models built with transformers (the reference implementation) and saved in HF layout."""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path

import pytest
import torch

from flashmoe.tokenizer_build import write_byte_tokenizer

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU-only machines; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# transformers is the reference only at the version pyproject.toml pins for the tests: the device's
# image carries another (5.17), whose MXFP4 dequantization gives other weights (off by 0.10 there).
PINNED_TRANSFORMERS = next(r.split("==")[1] for r in tomllib.loads(
    (Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    if r.startswith("transformers=="))
VOCAB = 320
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}

TEXT_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    rope_parameters=ROPE,
    max_position_embeddings=512,
)


# The other families at tiny shapes: what each exercises beyond the others (partial rotary, dense
# layers, expert groups, a correction bias, biases, q/k norms of both kinds).
FAMILY_CONFIGS = {
    "qwen3_moe": dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=48, norm_topk_prob=True,
        mlp_only_layers=[1], max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "minimax_m2": dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=None, eos_token_id=None,
    ),
    "glm4_moe": dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=48, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True,
        attention_bias=True, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
    # A window shorter than the parity prompt, a clamp the random activations cross, YaRN rotary
    "gpt_oss": dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=8, swiglu_limit=0.2,
        max_position_embeddings=512, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
    ),
    # The released VLM layout (a vision tower to skip). Three streams; n-gram embeddings of orders 2
    # and 3 before both DeltaNet layers, their tables in 12 row blocks (shard_10 sorts before
    # shard_2); QSA keeping 2 blocks of 4 (+ the tail) of the parity prompt's 24 positions.
    "qwen4_exp": dict(
        text_config=dict(
            TEXT_CONFIG, layer_types=["linear_attention", "indexed_attention", "linear_attention", "indexed_attention"],
            eos_token_id=7, hc_count=3, hc_lowrank=16, ple_layer_ids=[1, 3], ple_embed_dim=32, ple_conv_kernel_size=3,
            ngram_size=3, heads_per_ngram=4, ngram_vocab_size_base=50, make_ngram_vocab_size_divisible_by=16, seed=7,
            split_ngram_parts=12, indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8,
            indexer_compress_ratio=4,
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
    ),
}
FAMILY_CLASSES = {"qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig"),
                  "minimax_m2": ("MiniMaxM2ForCausalLM", "MiniMaxM2Config"),
                  "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig"),
                  "gpt_oss": ("GptOssForCausalLM", "GptOssConfig"),
                  "qwen4_exp": ("Qwen4ExpForConditionalGeneration", "Qwen4ExpConfig")}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with non-trivial scale everywhere (norm weights, biases and the routers' correction
    biases included), so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3)
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=gen).log())
            elif name.endswith("dt_bias") or p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if name.endswith("dt_bias") else 0.0))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def build_hf_model(kind: str, out: Path, seed: int = 0, wide_init: bool = True, **overrides) -> torch.nn.Module:
    """Save a tiny random model of `kind` in bf16 to `out`; return it in fp32 (the bf16 values upcast).

    wide_init: weights of unit gain everywhere (`randomize`), so every path shows in the logits;
    without it, transformers' own init (std 0.02), a tamer model for measuring quantization loss.

    kinds: "vlm" (Qwen3_5MoeForConditionalGeneration, released layout with a vision tower),
    "text" (Qwen3_5MoeForCausalLM), "next" (Qwen3NextForCausalLM, with a dense-MLP layer), and the
    other families by model_type (FAMILY_CONFIGS)."""
    import transformers as tf

    torch.manual_seed(seed)
    text = {**TEXT_CONFIG, **overrides}
    if kind == "vlm":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"])
        model = tf.Qwen3_5MoeForConditionalGeneration(tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision))
    elif kind == "text":
        model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**text))
    elif kind == "next":
        next_cfg = {"intermediate_size": 48, "mlp_only_layers": [1], "norm_topk_prob": False, **text}
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**next_cfg))
    elif kind in FAMILY_CONFIGS:
        model_class, config_class = (getattr(tf, name) for name in FAMILY_CLASSES[kind])
        model = model_class(config_class(**{**FAMILY_CONFIGS[kind], **overrides}))
    else:
        raise ValueError(kind)
    if wide_init:
        randomize(model, seed)
    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_byte_tokenizer(out)
    return model.float().eval()


@pytest.fixture
def slow_link(monkeypatch):
    """The CPU's share of host-resident experts takes as many as --cpu-experts lets it: the link's
    measured time per record made a second, so that tests of the share's mechanics do not hang on
    how this machine's CPU compares with its copies (experts/cpu_share.py measure_split)."""
    from flashmoe.experts import cpu_share

    monkeypatch.setattr(cpu_share, "link_seconds", lambda *_: 1.0)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """(hf_dir, reference model in fp32) for the released-layout VLM checkpoint."""
    d = tmp_path_factory.mktemp("vlm")
    return d, build_hf_model("vlm", d)


@pytest.fixture(scope="session")
def packed16(tiny_vlm, tmp_path_factory):
    from flashmoe.convert import convert

    out = tmp_path_factory.mktemp("packed") / "m16"
    convert(tiny_vlm[0], out, bits=16)
    return out


@pytest.fixture(scope="session")
def packed4(tiny_vlm, tmp_path_factory):
    from flashmoe.convert import convert

    out = tmp_path_factory.mktemp("packed") / "m4"
    convert(tiny_vlm[0], out, bits=4, group_size=32)  # the tiny experts have 32 inputs
    return out


@pytest.fixture(scope="session")
def default_init_16(tmp_path_factory):
    """transformers' own init: on the unit-gain model of the parity tests, a 0.5% weight error
    already flips routing decisions and grows ~10x to the logits; a trained model is not that chaotic."""
    d = tmp_path_factory.mktemp("default_init")
    from flashmoe.convert import convert

    build_hf_model("vlm", d / "hf", seed=4, wide_init=False)
    convert(d / "hf", d / "q16", bits=16)
    from flashmoe.engine import Engine, EngineConfig

    return d, Engine(d / "q16", EngineConfig(dtype="float32"))
