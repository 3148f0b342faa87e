"""The rotary embedding against transformers' own frequencies: plain RoPE, and YaRN as gpt-oss uses it."""

import pytest
import torch

from flashmoe.models import args_from_dict
from flashmoe.layers.rotary import RotaryEmbedding


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0, "original_max_position_embeddings": 1024},  # truncated ramp
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
     "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_cos_and_sin_are_transformers(rope):
    import transformers as tf
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    config = tf.GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2,
                             max_position_embeddings=131072, rope_parameters=dict(rope))
    positions = torch.tensor([0, 1, 7, 100, 4095, 70000])
    ref_cos, ref_sin = GptOssRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    args = args_from_dict({**config.to_dict(), "model_type": "gpt_oss"})
    cos, sin = RotaryEmbedding(*args.rotary(), args.yarn())(positions)
    assert torch.allclose(cos[:, :16], ref_cos[0], rtol=0, atol=1e-6) and torch.equal(cos[:, :16], cos[:, 16:])
    assert torch.allclose(sin[:, :16], ref_sin[0], rtol=0, atol=1e-6) and torch.equal(sin[:, :16], sin[:, 16:])
