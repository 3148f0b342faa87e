"""mlx-lm quantized checkpoints as converter input: affine experts repacked bit for bit, quantized
dense tensors dequantized, and what the record format cannot hold refused by name."""

import json

import pytest
import torch

from flashmoe.convert import ConversionError, convert
from flashmoe.formats.mlx import MlxFormatError, MlxQuantization

from ..conftest import build_hf_model
from ..mlx_checkpoint import to_mlx
from ..test_parity import check_parity

ROUTER_8BIT = {"model.layers.0.mlp.gate": (8, 64), "model.layers.2.mlp.gate": (8, 64)}  # as mlx-lm's mixed recipes


@pytest.fixture(scope="module")
def mlx_model(tmp_path_factory):
    """(mlx-lm checkpoint, transformers' model holding the weights it stands for: experts exact, the
    dense part rounded to bfloat16 as flashmoe stores it)."""
    d = tmp_path_factory.mktemp("mlx")
    reference = build_hf_model("qwen3_moe", d / "hf", seed=12)
    stands_for = to_mlx(reference, d / "hf", d / "mlx", 4, 16, ROUTER_8BIT)
    state = reference.state_dict()
    with torch.no_grad():
        for name, p in state.items():
            module = name.removesuffix(".weight")
            if name.endswith("experts.gate_up_proj"):
                layer = name.removesuffix(".experts.gate_up_proj")
                p.copy_(torch.cat([stands_for[f"{layer}.switch_mlp.gate_proj"], stands_for[f"{layer}.switch_mlp.up_proj"]], 1))
            elif name.endswith("experts.down_proj"):
                p.copy_(stands_for[name.replace("experts.down_proj", "switch_mlp.down_proj")])
            elif module in stands_for:
                p.copy_(stands_for[module].to(torch.bfloat16))
    return d / "mlx", reference


def test_experts_repack_bit_for_bit_and_the_model_runs_as_transformers(mlx_model, tmp_path):
    src, reference = mlx_model
    engine, _ = check_parity(src, reference, tmp_path, bits=None)
    layout = engine.manifest.layout
    assert (layout.scheme, layout.bits, layout.group_size) == ("affine", 4, 16)
    from flashmoe.formats.safetensors import Checkpoint

    raw = (engine.dir / engine.manifest.expert_file(2).file).read_bytes()
    views = layout.views(torch.frombuffer(bytearray(raw[3 * layout.record_size : 4 * layout.record_size]), dtype=torch.uint8))
    with Checkpoint(src) as ckpt:
        row = {f"{p}.{k}": ckpt.read_row(f"model.layers.2.mlp.switch_mlp.{p}.{k}", 3)
               for p in ("gate_proj", "up_proj", "down_proj") for k in ("weight", "scales", "biases")}
    assert torch.equal(views["gate_up_proj.weight"], torch.cat([row["gate_proj.weight"], row["up_proj.weight"]]).view(torch.int32))
    assert torch.equal(views["gate_up_proj.scales"], torch.cat([row["gate_proj.scales"], row["up_proj.scales"]]))
    assert torch.equal(views["down_proj.biases"], row["down_proj.biases"])


def test_requantizing_is_asked_for_and_said(mlx_model, tmp_path):
    src, _ = mlx_model
    report = convert(src, tmp_path / "q8", bits=8, group_size=32)
    assert report.experts == "MLX 4-bit dequantized, then stored 8-bit"
    assert convert(src, tmp_path / "kept").experts == "MLX 4-bit groups of 16, repacked bit for bit"


def test_what_the_records_cannot_hold_is_refused_naming_it(mlx_model, tmp_path):
    src, _ = mlx_model
    for quantization, message in [
        ({"group_size": 32, "bits": 3}, r"config.json: quantization has bits 3 and group_size 32: flashmoe reads 8, 4, 2-bit"),
        ({"group_size": 32, "bits": 4, "mode": "mxfp4"}, r"quantization mode 'mxfp4' is not MLX's affine groups"),
    ]:
        with pytest.raises(MlxFormatError, match=message):
            MlxQuantization.from_config({"quantization": quantization})
    bad = tmp_path / "fp16"  # fp16 scales that bfloat16 rounds: not bit for bit, so --bits is asked for
    bad.mkdir()
    from flashmoe.formats.safetensors import Checkpoint, save_file

    with Checkpoint(src) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names()}
    name = "model.layers.0.mlp.switch_mlp.up_proj.scales"
    tensors[name] = (tensors[name].float() * (1 + 2**-9)).to(torch.float16)
    save_file(tensors, bad / "model.safetensors")
    for f in ("config.json", "tokenizer.json"):
        (bad / f).write_bytes((src / f).read_bytes())
    with pytest.raises(ConversionError, match=f"{name} holds torch.float16 values that bfloat16 .* pass --bits 4"):
        convert(bad, tmp_path / "out")
    assert convert(bad, tmp_path / "requantized", bits=4, group_size=32).experts == "MLX 4-bit dequantized, then stored 4-bit"
    config = json.loads((src / "config.json").read_text())
    config["quantization"]["model.layers.2.mlp.switch_mlp.down_proj"] = {"group_size": 32, "bits": 8}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="quantized differently"):
        convert(bad, tmp_path / "mixed")
