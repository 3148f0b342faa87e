"""Tiny random models built with transformers (the reference implementation) and saved in HF layout."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU-only machines; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with no merges (ids 0-255 = bytes) plus ChatML specials (256-258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from flashmoe.tokenizer import default_chat_template
    from flashmoe.tokenizer_build import _byte_to_char_table

    chars = _byte_to_char_table()
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (out / "chat_template.jinja").write_text(default_chat_template())


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with non-trivial scale everywhere (norm weights included), so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
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
    "text" (Qwen3_5MoeForCausalLM), "next" (Qwen3NextForCausalLM, with a dense-MLP layer)."""
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
    else:
        raise ValueError(kind)
    if wide_init:
        randomize(model, seed)
    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_byte_tokenizer(out)
    return model.float().eval()


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
    from flashmoe.engine import Engine

    return d, Engine(d / "q16", dtype=torch.float32)
