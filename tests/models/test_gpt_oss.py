"""gpt-oss beyond 16-bit parity (tests/test_parity.py): its biased, clamped experts quantized, its
MXFP4 release kept as released, the GPU path for every record kind, and damaged or incomplete checkpoints."""

import pytest
import torch
import transformers

from flashmoe.convert import ConversionError, convert
from flashmoe.engine import Engine, EngineConfig
from flashmoe.formats.packed import Manifest
from flashmoe.formats.safetensors import Checkpoint, save_file

from ..conftest import PINNED_TRANSFORMERS, build_hf_model
from ..mxfp4_checkpoint import to_mxfp4_release
from ..test_parity import check_parity, our_run, rel_err


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_oss")
    build_hf_model("gpt_oss", d / "hf", seed=11)
    convert(d / "hf", d / "q16", bits=16)
    return d


def test_4bit_experts_with_biases_stay_close_to_16bit(gpt_oss):
    convert(gpt_oss / "hf", gpt_oss / "q4", bits=4, group_size=32)
    prompt = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2))
    ref_prompt, ref_steps, _ = our_run(Engine(gpt_oss / "q16", EngineConfig(dtype="float32")), prompt, 6)
    got_prompt, got_steps, _ = our_run(Engine(gpt_oss / "q4", EngineConfig(dtype="float32")), prompt, 6)
    assert rel_err(got_prompt, ref_prompt) < 0.05 and rel_err(got_steps, ref_steps) < 0.05  # measured 0.014, 0.013; seeds 12, 13 up to 0.040


@pytest.mark.parametrize("bits,tol", [(16, 1e-5), (4, 5e-3)])
def test_the_gpu_path_decodes_affine_and_16_bit_records_as_the_cpu_path(gpt_oss, tmp_path, bits, tol):
    """Converted gpt-oss experts (biases, the clamped SwiGLU) through the gathered and grouped affine
    kernels (Triton's interpreter here): the CPU path's logits, to fp32 rounding at 16 bits and the
    kernels' 16-bit fixed-point inputs at 4, and its greedy tokens."""
    pytest.importorskip("triton")
    convert(gpt_oss / "hf", tmp_path / "q", bits=bits, group_size=32)
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    cpu = our_run(Engine(tmp_path / "q", EngineConfig(dtype="float32", threads=1)), prompt, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = our_run(Engine(tmp_path / "q", EngineConfig(device=device, dtype="float32", gpu_path_on_cpu=device == "cpu")), prompt, 3)
    assert rel_err(gpu[0].cpu(), cpu[0]) < tol and rel_err(gpu[1].cpu(), cpu[1]) < tol and gpu[2] == cpu[2]


def test_the_gpu_path_decodes_mxfp4_as_the_cpu_path(mxfp4_release, tmp_path):
    """The GPU path's logic (GPU tier, the MXFP4 kernels in Triton's interpreter here; tests/test_gpu.py
    on a device) against the CPU path, prompt (the grouped pass) and decode (the gathered one)."""
    pytest.importorskip("triton")
    src, _ = mxfp4_release
    convert(src, tmp_path / "mx")
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    cpu = our_run(Engine(tmp_path / "mx", EngineConfig(dtype="float32", threads=1)), prompt, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = our_run(Engine(tmp_path / "mx", EngineConfig(device=device, dtype="float32", gpu_path_on_cpu=device == "cpu")), prompt, 3)
    # the prompt's grouped pass takes fp16 inputs (one tensor-core dot per group: 3.5e-5 here); decode
    # keeps fp32 activations
    assert rel_err(gpu[0].cpu(), cpu[0]) < 1e-4 and rel_err(gpu[1].cpu(), cpu[1]) < 1e-5 and gpu[2] == cpu[2]


def test_the_cpu_share_of_mxfp4_experts_changes_no_result(mxfp4_release, tmp_path, slow_link):
    """--cpu-experts on MXFP4 records (biases, the clamped SwiGLU), both ways: copying decode's
    host-resident misses computed by CpuExperts instead, and preloaded, the expert server's share
    through the mailbox. Each run's logits match the same placement's without the CPU (the GPU
    path's logic and kernels in Triton's interpreter here)."""
    pytest.importorskip("triton")
    pytest.importorskip("numba")
    src, _ = mxfp4_release
    convert(src, tmp_path / "mx")
    record = Manifest.load(tmp_path / "mx").layout.record_size
    prompt = torch.randint(0, 256, (4,), generator=torch.Generator().manual_seed(5))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for resident in (False, True):
        engine = Engine(tmp_path / "mx", EngineConfig(device=device, dtype="float32", host_mem=32 * record,
                                                       gpu_path_on_cpu=device == "cpu"))
        engine.use_gpu_experts(gpu_mem=6 * record, policy="static")  # 2 of 8 experts per layer on the GPU
        engine.preload() if resident else engine.place_experts(2, 6)
        runs = {}
        for per_layer in (0, 1):
            engine.set_cpu_experts(per_layer)
            computed = engine.gpu_tier.stats.cpu_computed
            runs[per_layer] = our_run(engine, prompt, 3)
            engine.settle("prefill")
            assert (engine.gpu_tier.stats.cpu_computed > computed) == bool(per_layer)
        engine.set_cpu_experts(0)  # stops the server's threads
        (plain_prompt, plain_steps, plain_tokens), (prompt_logits, steps, tokens) = runs[0], runs[1]
        assert torch.equal(prompt_logits, plain_prompt)  # prefill copies: no CPU share
        assert rel_err(steps.cpu(), plain_steps.cpu()) < 1e-5 and tokens == plain_tokens  # measured 1.2e-7 both ways


def test_a_checkpoint_without_expert_biases_is_refused_naming_them(gpt_oss, tmp_path):
    src = gpt_oss / "hf"
    with Checkpoint(src) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names() if not n.endswith("experts.down_proj_bias")}
    (tmp_path / "hf").mkdir()
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / "hf" / f).write_bytes((src / f).read_bytes())
    with pytest.raises(ConversionError, match="layer 0: incomplete experts .*mlp.experts.down_proj_bias.*first missing: down_proj_bias"):
        convert(tmp_path / "hf", tmp_path / "out", bits=16)


@pytest.fixture(scope="module")
def mxfp4_release(gpt_oss):
    """The MXFP4 release layout of the tiny model, and transformers' model read from that file (dequantized)."""
    import transformers as tf

    to_mxfp4_release(gpt_oss / "hf", gpt_oss / "mx")
    reference = tf.GptOssForCausalLM.from_pretrained(gpt_oss / "mx", quantization_config=tf.Mxfp4Config(dequantize=True),
                                                     dtype=torch.float32)
    return gpt_oss / "mx", reference.eval()


@pytest.mark.skipif(transformers.__version__ != PINNED_TRANSFORMERS,
                    reason=f"transformers' MXFP4 loading is the reference at {PINNED_TRANSFORMERS} only")
def test_mxfp4_experts_are_kept_as_released_and_generate_what_transformers_does(mxfp4_release, tmp_path):
    src, reference = mxfp4_release
    engine, _ = check_parity(src, reference, tmp_path, bits=None)  # the default --bits: MXFP4 kept
    layout = engine.manifest.layout
    assert (layout.scheme, layout.bits, layout.with_bias) == ("mxfp4", 4, True)
    with Checkpoint(src) as ckpt:  # record bytes = the released rows, gate rows first
        blocks, scales = ckpt.read_row("model.layers.1.mlp.experts.gate_up_proj_blocks", 5), ckpt.read_row(
            "model.layers.1.mlp.experts.gate_up_proj_scales", 5)
        down = ckpt.read_row("model.layers.1.mlp.experts.down_proj_blocks", 5)
    raw = (engine.dir / engine.manifest.expert_file(1).file).read_bytes()
    views = layout.views(torch.frombuffer(bytearray(raw[5 * layout.record_size : 6 * layout.record_size]), dtype=torch.uint8))
    assert torch.equal(views["gate_up_proj.blocks"], torch.cat([blocks[0::2], blocks[1::2]]).reshape(64, -1))
    assert torch.equal(views["gate_up_proj.scales"], torch.cat([scales[0::2], scales[1::2]]))
    assert torch.equal(views["down_proj.blocks"], down.reshape(64, -1))


def test_mxfp4_to_16_bits_is_exact(mxfp4_release, tmp_path):
    src, _ = mxfp4_release
    convert(src, tmp_path / "kept")
    report = convert(src, tmp_path / "q16", bits=16)
    assert report.experts == "MXFP4 dequantized, then stored 16-bit" and report.relative_errors()["experts.gate_up_proj"] == 0
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(3))
    kept = our_run(Engine(tmp_path / "kept", EngineConfig(dtype="float32", threads=1)), prompt, 3)
    exact = our_run(Engine(tmp_path / "q16", EngineConfig(dtype="float32", threads=1)), prompt, 3)
    assert rel_err(exact[0], kept[0]) < 1e-6 and exact[2] == kept[2]


def test_damaged_mxfp4_tensors_are_refused_naming_them(mxfp4_release, tmp_path):
    src, _ = mxfp4_release
    with Checkpoint(src) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names()}
    for change, message in [
        ({"model.layers.2.mlp.experts.down_proj_scales": "nan"},
         r"model.layers.2.mlp.experts.down_proj_scales: expert 3 holds the scale byte 255.*download it again"),
        ({"model.layers.0.mlp.experts.gate_up_proj_scales": "short"},
         r"model.layers.0.mlp.experts.gate_up_proj_scales has shape \[8, 64, 1\], expected \[8, 64, 2\] \(MXFP4 blocks and scales"),
    ]:
        (name, how), = change.items()
        broken = dict(tensors)
        broken[name] = broken[name].clone()
        if how == "nan":
            broken[name][3, 7, 0] = 255
        else:
            broken[name] = broken[name][..., :1].contiguous()
        bad = tmp_path / how
        bad.mkdir()
        save_file(broken, bad / "model.safetensors")
        for f in ("config.json", "tokenizer.json"):
            (bad / f).write_bytes((src / f).read_bytes())
        with pytest.raises(ConversionError, match=message):
            convert(bad, tmp_path / f"{how}-out")
        assert not (tmp_path / f"{how}-out").exists()


def test_mxfp4_records_export_back_to_the_release_byte_for_byte(mxfp4_release, tmp_path):
    """scripts/export_hf.py on a packed MXFP4 model writes the release's tensors again (the names
    the release spells, gate and up rows interleaved as released, the same bytes), and converting
    that export writes the same records and dense weights: how the same weights reach other
    engines (llama.cpp's converter reads the release layout)."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    src, _ = mxfp4_release
    convert(src, tmp_path / "packed")
    script = Path(__file__).parents[2] / "scripts" / "export_hf.py"
    subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "packed"), "--out", str(tmp_path / "hf")],
                   check=True, capture_output=True)
    with Checkpoint(src) as release, Checkpoint(tmp_path / "hf") as export:
        assert set(export.names()) == set(release.names())
        for name in release.names():
            if "experts" in name:
                assert torch.equal(export.read(name), release.read(name).to(export.read(name).dtype)), name
    convert(tmp_path / "hf", tmp_path / "again")
    first, second = Manifest.load(tmp_path / "packed"), Manifest.load(tmp_path / "again")
    for a, b in zip(first.expert_files, second.expert_files):
        assert (tmp_path / "packed" / a.file).read_bytes() == (tmp_path / "again" / b.file).read_bytes()
    a, b = load_file(tmp_path / "packed" / first.dense_file), load_file(tmp_path / "again" / second.dense_file)
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
