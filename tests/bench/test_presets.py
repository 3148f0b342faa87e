"""Every bench preset is a released model's config.json that its family reads: its size comes out
as the model's name says (the sum of the modules' tensors and the experts' records)."""

import math

import pytest
import torch

from flashmoe.bench.presets import PRESETS, preset_args, preset_config
from flashmoe.bench.synthesis import dense_tensors
from flashmoe.layers.ple import table_rows

SIZES = {  # billions of parameters, from the names (GLM-4.5's 355B counts its MTP layer, which is not run)
    "qwen3.5-397b-a17b": 397, "qwen3.5-122b-a10b": 122, "qwen3.6-35b-a3b": 35, "qwen3-next-80b-a3b": 80,
    "qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235, "qwen3-coder-480b-a35b": 480, "minimax-m2": 230, "glm-4.5": 355,
    "gpt-oss-120b": 116.8, "gpt-oss-20b": 20.9,  # the model card's counts: the names round them
    "qwen3.8-flash-next": 125,  # without its n-gram tables (test_qwen3_8_flash_next_counts_its_tables_apart)
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_the_size_of_the_released_model(name):
    args = preset_args(name)
    moe = args.moe
    experts = len(args.moe_layers) * moe.num_experts * 3 * args.hidden_size * moe.intermediate
    dense = sum(math.prod(shape) for _, shape, _, _ in dense_tensors(args))
    assert (experts + dense) / 1e9 == pytest.approx(SIZES[name], rel=0.015)
    assert all(0 <= i < args.vocab_size for i in args.eos_token_ids)  # a stop token the model can emit


def test_qwen3_8_flash_next_counts_its_tables_apart():
    """125B without the n-gram tables (51.2B more, 354 GB in all at 16 bits, as the release's BF16
    weights), ~6B active: the dense weights but the embedding and the head, and 10 experts a layer."""
    args = preset_args("qwen3.8-flash-next")
    specs = [args.layer(i).ple for i in range(args.num_hidden_layers) if args.layer(i).ple is not None]
    tables = sum(table_rows(spec) * spec.dim // spec.heads for spec in specs)
    assert tables / 1e9 == pytest.approx(51.2, rel=0.01)
    moe, H = args.moe, args.hidden_size
    dense = sum(math.prod(shape) for name, shape, _, _ in dense_tensors(args) if name not in ("model.embed_tokens.weight", "lm_head.weight"))
    active = dense + len(args.moe_layers) * moe.top_k * 3 * H * moe.intermediate
    assert active / 1e9 == pytest.approx(6, rel=0.015)


def test_gpt_oss_synthesizes_mxfp4_records_with_biases():
    from flashmoe.bench.synthesis import random_records, record_layout

    layout = record_layout(preset_args("gpt-oss-20b", layers=2), bits=4)
    assert (layout.scheme, layout.group_size, layout.with_bias) == ("mxfp4", 32, True)
    assert record_layout(preset_args("gpt-oss-20b", layers=2), bits=8).scheme == "affine"
    record = random_records(layout, 1, torch.Generator().manual_seed(0))[0]
    gate_up, down = layout.weights(record, torch.float32)
    assert 0.7 < float(gate_up.std() * 2880**0.5) < 1.4 and 0.7 < float(down.std() * 2880**0.5) < 1.4  # unit gain
    assert not layout.biases(record, torch.float32)[0].any()


def test_a_slice_keeps_the_first_layers():
    assert preset_args("glm-4.5", layers=8).moe_layers == [3, 4, 5, 6, 7]  # its first 3 layers are dense
    assert preset_config("qwen3.5-397b-a17b", layers=4)["num_hidden_layers"] == 4
    with pytest.raises(ValueError, match="--layers must be between 1 and 62"):
        preset_config("minimax-m2", layers=63)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("llama")

