"""Hyper-connections against transformers' Qwen4-Exp gated residual."""

import torch

from flashmoe.layers.hyper import HyperConnection, HyperSpec

from ..conftest import FAMILY_CONFIGS, randomize
from ..test_parity import rel_err


@torch.no_grad()
def test_mix_and_injection_are_transformers():
    import transformers as tf
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextGatedResidual

    config = tf.Qwen4ExpTextConfig(**FAMILY_CONFIGS["qwen4_exp"]["text_config"])
    H, streams = config.hidden_size, config.hc_count
    x = torch.randn(9, streams * H, generator=torch.Generator().manual_seed(0)) * 3
    out = torch.randn(9, H, generator=torch.Generator().manual_seed(1))
    for injects in (True, False):
        ref = Qwen4ExpTextGatedResidual(config, use_combine=injects)
        randomize(ref, 2)
        ours = HyperConnection(H, HyperSpec(streams, config.hc_lowrank), config.rms_norm_eps, True, injects=injects)
        ours.load_state_dict(ref.state_dict())
        expected = ref(x)
        mixed, shares = ours(x)
        if not injects:
            assert shares is None and rel_err(mixed, expected) < 1e-6
            continue
        ref_mixed, _, ref_shares = expected
        assert rel_err(mixed, ref_mixed) < 1e-6 and rel_err(shares, ref_shares) < 1e-6
        after = x + (out.unsqueeze(-2) * ref_shares.unsqueeze(-1)).flatten(-2)  # transformers' decoder layer
        assert rel_err(HyperConnection.inject(x, out, shares), after) < 1e-6
