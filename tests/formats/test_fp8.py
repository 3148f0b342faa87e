"""Block-FP8 checkpoints (the official FP8 releases' layout) as converter input: dequantized as
transformers dequantizes them, the model then running as transformers does on those weights, and
what is missing or inconsistent refused by name."""

import json

import pytest
import torch

from flashmoe.convert import ConversionError, convert
from flashmoe.formats import fp8
from flashmoe.formats.safetensors import Checkpoint, save_file

from ..conftest import build_hf_model
from ..test_parity import check_parity

BLOCK = (32, 32)  # the dense MLP's 48 columns end in a partial block


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], fp32 factors [ceil(N/32), ceil(K/32)]): each block scaled to e4m3's 448."""
    n, k = w.shape
    scales = torch.empty(-(-n // BLOCK[0]), -(-k // BLOCK[1]))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]].float()
            scales[i, j] = block.abs().max().clamp_min(1e-12) / 448
            q[i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]] = (block / scales[i, j]).to(torch.float8_e4m3fn)
    return q, scales


def test_dequantization_is_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(70, 100, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 4, generator=g) + 0.01
    got = fp8.dequantize(w, scale, BLOCK, "w")
    assert torch.equal(got, _dequantize_fp8_weight(w, scale, list(BLOCK), torch.float32))
    with pytest.raises(fp8.Fp8FormatError, match=r"w_scale_inv has shape \[3, 3\]; a \[70, 100\] weight in blocks of 32 x 32 needs \[3, 4\]"):
        fp8.dequantize(w, scale[:, :3], BLOCK, "w")


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    """A tiny qwen3_moe in the FP8 releases' layout (per-expert tensors, projections FP8, embeddings,
    norms and routers 16-bit), and transformers' model holding the weights it stands for (rounded to
    bfloat16, as a 16-bit conversion stores them)."""
    d = tmp_path_factory.mktemp("fp8")
    reference = build_hf_model("qwen3_moe", d / "hf", seed=14)
    tensors, state = {}, reference.state_dict()
    with torch.no_grad():
        for name, p in state.items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                layer, I = name.split(".mlp.")[0], p.shape[1] // 2
                parts = {"gate_proj": p[:, :I], "up_proj": p[:, I:]} if name.endswith("gate_up_proj") else {"down_proj": p}
                for proj, w in parts.items():
                    for e in range(p.shape[0]):
                        q, s = quantize(w[e])
                        tensors[f"{layer}.mlp.experts.{e}.{proj}.weight"], tensors[f"{layer}.mlp.experts.{e}.{proj}.weight_scale_inv"] = q, s
                        w[e].copy_(torch.kron(s, torch.ones(BLOCK))[: w.shape[1], : w.shape[2]] * q.float())
                p.copy_(p.to(torch.bfloat16))
            elif p.dim() == 2 and "proj" in name:
                q, s = quantize(p)
                tensors[name], tensors[name + "_scale_inv"] = q, s
                p.copy_((torch.kron(s, torch.ones(BLOCK))[: p.shape[0], : p.shape[1]] * q.float()).to(torch.bfloat16))
            else:
                tensors[name] = p.to(torch.bfloat16)
    out = d / "release"
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    config = json.loads((d / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").write_bytes((d / "hf" / "tokenizer.json").read_bytes())
    return out, reference.eval()


def test_an_fp8_release_runs_as_transformers_on_its_weights(fp8_release, tmp_path):
    src, reference = fp8_release
    engine, _ = check_parity(src, reference, tmp_path)
    assert engine.manifest.layout.bits == 16
    assert convert(src, tmp_path / "q4", bits=4, group_size=16).experts == "FP8 dequantized, then stored 4-bit"


def test_missing_or_undeclared_fp8_is_refused_naming_it(fp8_release, tmp_path):
    src, _ = fp8_release
    with Checkpoint(src) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names()}
    config = json.loads((src / "config.json").read_text())
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    cases = [
        ({k: v for k, v in tensors.items() if k != name + "_scale_inv"}, config, f"{name} is FP8 but {name}_scale_inv is missing"),
        (tensors, {k: v for k, v in config.items() if k != "quantization_config"},
         r"is torch.float8_e4m3fn, but config.json declares no block-FP8"),
    ]
    for i, (ts, cfg, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        save_file(ts, bad / "model.safetensors")
        (bad / "config.json").write_text(json.dumps(cfg))
        (bad / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
        with pytest.raises(ConversionError, match=message):
            convert(bad, tmp_path / f"out{i}", bits=16)
