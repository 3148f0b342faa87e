import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flashmoe import convert as convert_module
from flashmoe.convert import ConversionError, convert
from flashmoe.synthetic import SMALL_TEXT_CONFIG, hf_tensor_specs
from flashmoe.formats.packed import Manifest, PackedFormatError
from flashmoe.formats.safetensors import SafetensorsWriter

from .conftest import write_byte_tokenizer


def write_checkpoint(out, **text_overrides):
    """A random checkpoint in the released layout (fused experts), via the synthetic tensor list."""
    out.mkdir(parents=True)
    cfg = {**SMALL_TEXT_CONFIG, "vocab_size": 512, **text_overrides}
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": cfg}))
    write_byte_tokenizer(out)
    tensors = hf_tensor_specs(cfg)
    writer = SafetensorsWriter(out / "model.safetensors", [(n, torch.bfloat16, s) for n, s, _ in tensors])
    g = torch.Generator().manual_seed(0)
    for n, s, _ in tensors:
        writer.write(n, (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16))
    writer.close()
    return out, max(torch.Size(s).numel() * 2 for _, s, _ in tensors), sum(torch.Size(s).numel() * 2 for _, s, _ in tensors)


def test_existing_destination_bad_bits_and_group_size(tiny_vlm, packed16, tmp_path):
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_vlm[0], packed16)
    with pytest.raises(ConversionError, match="16, 8, 4 or 2"):
        convert(tiny_vlm[0], tmp_path / "x", bits=3)
    with pytest.raises(ValueError, match="not a multiple of --group-size 64"):
        convert(tiny_vlm[0], tmp_path / "x", bits=4, group_size=64)  # the tiny experts have 32 inputs


def test_missing_tensor_is_reported(tmp_path, tiny_vlm):
    from flashmoe.formats.safetensors import Checkpoint, save_file

    src = tmp_path / "broken"
    src.mkdir()
    with Checkpoint(tiny_vlm[0]) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names() if "layers.3.self_attn.k_norm" not in n}
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text((tiny_vlm[0] / "config.json").read_text())
    with pytest.raises(ConversionError, match="missing 1 tensors.*k_norm"):
        convert(src, tmp_path / "out", bits=16)
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_nothing_loadable(tiny_vlm, tmp_path, monkeypatch):
    calls = 0
    real = convert_module.quant.quantize

    def quantize_then_interrupt(*args):
        nonlocal calls
        calls += 1
        if calls == 20:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert_module.quant, "quantize", quantize_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_vlm[0], tmp_path / "out", bits=4, group_size=32)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too
    with pytest.raises(PackedFormatError):
        Manifest.load(tmp_path / "out")


def test_killed_conversion_leaves_nothing_loadable_and_is_cleaned_up(tmp_path):
    src, _, _ = write_checkpoint(tmp_path / "src", num_hidden_layers=8, num_experts=64)
    proc = subprocess.Popen([sys.executable, "-m", "flashmoe", "convert", str(src), str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path).glob(".out.partial-*/experts/layer_001.bin")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert partial and not (partial[0] / "flashmoe.json").exists()  # never a manifest in a partial directory
    convert(src, tmp_path / "out", bits=16, console=None)  # the next run removes the dead run's leftovers
    assert not list(tmp_path.glob(".out.partial-*"))
    Manifest.load(tmp_path / "out")


def test_peak_rss_stays_a_small_multiple_of_the_largest_tensor(tmp_path):
    src, largest, total = write_checkpoint(
        tmp_path / "src", num_hidden_layers=12, layer_types=["linear_attention"] * 12, num_experts=32
    )
    # The baseline is taken after torch's one-time lazy imports (meta-device init pulls in ~125 MiB
    # of code the first time), which do not depend on the checkpoint.
    probe = (
        "import resource, sys, torch; from flashmoe.convert import convert; "
        "torch.nn.Embedding(2, 2, device='meta'); "
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; "
        "convert(sys.argv[1], sys.argv[2], bits=4); "
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(src), str(tmp_path / "out")], capture_output=True, text=True, check=True)
    base, peak = map(int, out.stdout.split())
    bound = 4 * largest
    assert total > 3 * bound  # the checkpoint is several times larger than the bound
    assert peak - base < bound, (peak - base, largest, total)
