"""--dense-bits 8: the large dense projections as int8 on the CPU path (the GPU kernel's own tests
are in tests/kernels/test_int8_gemv.py; the GPU engine is in tests/test_gpu.py)."""

import pytest
import torch

from flashmoe.bench.presets import preset_args
from flashmoe.bench.synthesis import synthesize
from flashmoe.bench.tiers import dense_bytes
from flashmoe.models import args_from_dict
from flashmoe.engine import Engine, EngineConfig
from flashmoe.layers.int8_linear import Bf16Embedding, Bf16Linear, Int8Linear, dequantized_matmul
from flashmoe.runtime.sampling import SamplingParams

from tests.bench.test_bench import TINY


@pytest.fixture(scope="module")
def engines(default_init_16):
    """(16-bit, 8-bit) engines in fp32 over the same packed model (transformers' own init)."""
    d, engine16 = default_init_16
    return engine16, Engine(d / "q16", EngineConfig(dtype="float32", dense_bits=8))


def test_only_the_large_projections_are_int8(engines):
    model = engines[1].model
    linear, attention, moe = model.layers[0].linear_attn, model.layers[3].self_attn, model.layers[0].mlp
    for m in (linear.in_proj_qkv, linear.in_proj_z, linear.out_proj, attention.q_proj, attention.o_proj,
              moe.shared_expert.gate_proj, moe.shared_expert.down_proj, model.lm_head):
        assert isinstance(m, Int8Linear) and m.weight.dtype == torch.int8
    for m in (linear.in_proj_a, linear.in_proj_b, moe.gate, moe.shared_expert_gate):  # 16-bit, computed in fp32
        assert isinstance(m, Bf16Linear) and m.weight.dtype == torch.bfloat16
    assert isinstance(model.model.embed_tokens, Bf16Embedding) and model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_bf16_table_gives_fp32_rows_and_the_tied_heads_logits():
    """The CPU engine's embedding table as stored (bf16): rows looked up are its values in fp32, and
    the tied head over several rows (dequantized_matmul) is x @ table^T in fp32."""
    g = torch.Generator().manual_seed(4)
    table = Bf16Embedding(50, 16)
    table.weight = torch.randn(50, 16, generator=g).bfloat16()
    ids, x = torch.tensor([3, 0, 49]), torch.randn(3, 16, generator=g)
    assert torch.equal(table(ids), table.weight[ids].float())
    want = x @ table.weight.float().t()
    assert float((dequantized_matmul(x, table.weight) - want).norm() / want.norm()) < 1e-6


def test_logits_and_greedy_tokens_track_16_bit(engines):
    """Measured with seed 11 (8 prompts of 16 tokens): logits relative error max 0.0144, mean 0.0079
    (bf16 compute against fp32 gives 0.0191 / 0.0081 on the same model); next-token top-1 agreement
    125/128; greedy continuations identical for all 8 x 16 tokens."""
    e16, e8 = engines
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (16,), generator=g) for _ in range(8)]
    errors, agree = [], 0
    with torch.inference_mode():
        for p in prompts:
            a = e16.forward(p, e16.new_state(), last_only=False)
            b = e8.forward(p, e8.new_state(), last_only=False)
            errors.append(float((a - b).norm() / a.norm()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    assert 0 < max(errors) < 0.03 and agree >= 0.93 * 128
    common = total = 0
    for p in prompts[:4]:
        ref = [s.token for s in e16.generate(p.tolist(), SamplingParams(max_tokens=12))]
        got = [s.token for s in e8.generate(p.tolist(), SamplingParams(max_tokens=12))]
        common += next((i for i, (r, t) in enumerate(zip(ref, got)) if r != t), len(ref))
        total += len(ref)
    assert common >= 0.8 * total  # tokens before the first divergence


def test_dense_bits_other_than_16_or_8_are_refused(default_init_16):
    with pytest.raises(ValueError, match="--dense-bits must be 16 or 8"):
        Engine(default_init_16[0] / "q16", EngineConfig(dense_bits=4))


@pytest.mark.parametrize("dense_bits", [16, 8])
def test_bench_accounting_equals_the_resident_weights(tmp_path_factory, dense_bits):
    """bench.dense_bytes (tier planning, from shapes) and the decode roofline's bytes (from the
    loaded modules) agree with each other."""
    out = synthesize(tmp_path_factory.mktemp("bench8") / "m", TINY, bits=4, group_size=32)
    engine = Engine(out, EngineConfig(dtype="bfloat16", dense_bits=dense_bits))
    embedding = engine.model.model.embed_tokens.weight
    resident = engine.dense_bytes_per_token() + embedding.numel() * embedding.element_size()
    assert resident == dense_bytes(args_from_dict(TINY), dense_bits)


def test_8_bit_dense_part_of_the_397b_is_56_percent():
    full = preset_args("qwen3.5-397b-a17b")
    assert dense_bytes(full) == pytest.approx(18.25 * 2**30, rel=1e-3)
    assert dense_bytes(full, 8) == pytest.approx(10.22 * 2**30, rel=1e-3)  # the embedding table stays bf16: 1.9 GiB


def test_projections_with_biases_keep_them_in_8_bit(tmp_path):
    """GLM's q/k/v have biases: they become Int8Linear layers that add their 16-bit bias (fused into
    one q/k/v matmul), and the logits track the 16-bit model's as the bias-free ones do."""
    from flashmoe.convert import convert

    from tests.conftest import build_hf_model

    build_hf_model("glm4_moe", tmp_path / "hf", seed=4)
    convert(tmp_path / "hf", tmp_path / "q16", bits=16)
    e16 = Engine(tmp_path / "q16", EngineConfig(dtype="float32"))
    e8 = Engine(tmp_path / "q16", EngineConfig(dtype="float32", dense_bits=8))
    attention = e8.model.layers[1].self_attn
    assert isinstance(attention.q_proj, Int8Linear) and attention.q_proj.bias is not None
    assert torch.equal(attention.q_proj.bias, e16.model.layers[1].self_attn.q_proj.bias)
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a = e16.forward(ids, e16.new_state(), last_only=False)
        b = e8.forward(ids, e8.new_state(), last_only=False)
    # without its bias the 8-bit q/k/v would be off by the bias (|bias| ~ 0.2 against unit-scale outputs)
    assert 0 < float((a - b).norm() / a.norm()) < 0.03
