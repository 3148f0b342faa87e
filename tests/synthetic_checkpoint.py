"""Random-weight tensors of a Qwen3.5-MoE shape, named as in the released Hugging Face checkpoint
(`model.language_model.` prefix, fused expert tensors): converter inputs of any size for the tests,
without building a transformers model."""

from __future__ import annotations


SMALL_TEXT_CONFIG = {  # hidden 256, 8 layers, 64 experts: small, yet every tensor kind of the real model
    "model_type": "qwen3_5_moe_text",
    "vocab_size": 248320,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "eos_token_id": 248046,
}


def hf_tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) of every tensor, in the released checkpoint's naming."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    E, I, Is = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    nk, nv, dk, dv = (cfg[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"))
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    conv = 2 * nk * dk + nv * dv
    out = [("lm_head.weight", (V, H), "linear"), ("model.language_model.embed_tokens.weight", (V, H), "linear")]
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.language_model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,), "norm"), (p + "post_attention_layernorm.weight", (H,), "norm")]
        if kind == "linear_attention":
            a = p + "linear_attn."
            out += [
                (a + "in_proj_qkv.weight", (conv, H), "linear"),
                (a + "in_proj_z.weight", (nv * dv, H), "linear"),
                (a + "in_proj_b.weight", (nv, H), "linear"),
                (a + "in_proj_a.weight", (nv, H), "linear"),
                (a + "conv1d.weight", (conv, 1, cfg["linear_conv_kernel_dim"]), "conv"),
                (a + "dt_bias", (nv,), "ones"),
                (a + "A_log", (nv,), "a_log"),
                (a + "norm.weight", (dv,), "ones"),
                (a + "out_proj.weight", (H, nv * dv), "linear"),
            ]
        else:
            a = p + "self_attn."
            out += [
                (a + "q_proj.weight", (2 * nh * hd, H), "linear"),
                (a + "k_proj.weight", (nkv * hd, H), "linear"),
                (a + "v_proj.weight", (nkv * hd, H), "linear"),
                (a + "o_proj.weight", (H, nh * hd), "linear"),
                (a + "q_norm.weight", (hd,), "norm"),
                (a + "k_norm.weight", (hd,), "norm"),
            ]
        m = p + "mlp."
        out += [
            (m + "gate.weight", (E, H), "linear"),
            (m + "experts.gate_up_proj", (E, 2 * I, H), "linear"),
            (m + "experts.down_proj", (E, H, I), "linear"),
            (m + "shared_expert.gate_proj.weight", (Is, H), "linear"),
            (m + "shared_expert.up_proj.weight", (Is, H), "linear"),
            (m + "shared_expert.down_proj.weight", (H, Is), "linear"),
            (m + "shared_expert_gate.weight", (1, H), "linear"),
        ]
    return out + [("model.language_model.norm.weight", (H,), "norm")]
