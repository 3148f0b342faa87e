"""The routing rules against the routers of transformers' modeling files (the reference), on fresh
random inputs."""

import pytest
import torch

from flashmoe.moe.routing import Routing, route_reference

transformers = pytest.importorskip("transformers")


def hf_router(model_type: str, E: int, k: int, H: int, **rule):
    """A transformers router module of the family, with random weights (and correction bias)."""
    import transformers.models.glm4_moe.modeling_glm4_moe as glm
    import transformers.models.minimax_m2.modeling_minimax_m2 as minimax
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen

    if model_type == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=k, **rule)
        return qwen.Qwen3MoeTopKRouter(cfg)
    if model_type == "minimax_m2":
        cfg = transformers.MiniMaxM2Config(hidden_size=H, num_local_experts=E, num_experts_per_tok=k)
        return minimax.MiniMaxM2TopKRouter(cfg)
    cfg = transformers.Glm4MoeConfig(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k, **rule)
    return glm.Glm4MoeTopkRouter(cfg)


CASES = [  # (model_type, E, k, transformers' config keys, our rule)
    ("qwen3_moe", 16, 4, {"norm_topk_prob": True}, Routing()),
    ("qwen3_moe", 16, 4, {"norm_topk_prob": False}, Routing(norm_topk=False)),
    ("minimax_m2", 16, 4, {}, Routing("sigmoid", correction_bias=True)),
    ("glm4_moe", 16, 4, {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
     Routing("sigmoid", correction_bias=True, n_group=4, topk_group=2, scaling=2.5)),
    ("glm4_moe", 20, 3, {"norm_topk_prob": False}, Routing("sigmoid", norm_topk=False, correction_bias=True)),
]


@pytest.mark.parametrize("model_type,E,k,hf_rule,rule", CASES)
def test_rule_matches_the_family_router_of_transformers(model_type, E, k, hf_rule, rule):
    torch.manual_seed(E + k)
    router = hf_router(model_type, E, k, 32, **hf_rule).float()
    bias = torch.randn(E) * 0.3 if rule.correction_bias else None
    with torch.no_grad():
        router.weight.normal_()
        if bias is not None and hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(bias)
        x = torch.randn(7, 32)
        args = (x, bias) if model_type == "minimax_m2" else (x,)
        logits, ref_weights, ref_ids = router(*args)
    weights, ids = route_reference(logits, k, rule, bias)
    # transformers' sigmoid routers take an unsorted top-k: compare as sets with their weights
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    assert torch.allclose(weights.gather(1, order), ref_weights.float().gather(1, ref_order), rtol=1e-6, atol=1e-7)


def test_rules_that_cannot_be_met_are_refused():
    with pytest.raises(ValueError, match="go with sigmoid"):
        Routing(correction_bias=True)
    with pytest.raises(ValueError, match="topk_group"):
        Routing("sigmoid", n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="equal groups"):
        Routing("sigmoid", n_group=3).check(16, 2)
    with pytest.raises(ValueError, match="cannot be chosen"):
        Routing("sigmoid", n_group=4, topk_group=1).check(16, 5)
