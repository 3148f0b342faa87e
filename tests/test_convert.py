import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashmoe import convert as convert_module
from flashmoe.convert import ConversionError, convert
from .synthetic_checkpoint import SMALL_TEXT_CONFIG, hf_tensor_specs
from flashmoe.formats.packed import Manifest, PackedFormatError
from flashmoe.formats.safetensors import SafetensorsWriter

from .conftest import VOCAB, write_byte_tokenizer


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


def files_under(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_oversized_tokenizer(model_dir: Path, extra: int = VOCAB) -> int:
    """Replace the model's tokenizer with one of `extra` more tokens; return its size."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_special_tokens([f"<extra_{i}>" for i in range(extra)])
    tok.save(str(model_dir / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def test_existing_destination_bad_bits_and_group_size(tiny_vlm, packed16, tmp_path):
    with pytest.raises(ConversionError, match="already exists"):
        convert(tiny_vlm[0], packed16)
    with pytest.raises(ValueError, match="16, 8, 4 or 2"):
        convert(tiny_vlm[0], tmp_path / "x", bits=3)
    with pytest.raises(ValueError, match="not a multiple of --group-size 64"):
        convert(tiny_vlm[0], tmp_path / "x", bits=4, group_size=64)  # the tiny experts have 32 inputs
    for impossible in (0, -32, 48, 4):  # not a power of two, or less than a 32-bit word at 4 bits
        with pytest.raises(ValueError, match=f"--group-size {impossible} cannot quantize at 4 bits"):
            convert(tiny_vlm[0], tmp_path / "x", bits=4, group_size=impossible)
    assert list(tmp_path.iterdir()) == []


def test_a_destination_that_is_holds_or_lies_inside_the_source_is_refused_before_anything_is_read(
    tiny_vlm, tmp_path, monkeypatch
):
    src = Path(shutil.copytree(tiny_vlm[0], tmp_path / "hf"))  # a private copy: a regression destroys only it
    (tmp_path / "link").symlink_to(src)
    before = files_under(src)
    monkeypatch.setattr(convert_module, "read_args", lambda path: pytest.fail("the source was read"))
    refused = {src: "is the source", tmp_path / "link": "is the source", tmp_path: "contains the source",
               src / "packed": "lies inside the source"}
    for dst, message in refused.items():
        for force in (False, True):
            with pytest.raises(ConversionError, match=message):
                convert(src, dst, bits=16, force=force)
    assert files_under(src) == before and sorted(tmp_path.iterdir()) == [src, tmp_path / "link"]


def test_force_replaces_only_a_model_that_convert_wrote(tiny_vlm, tmp_path):
    src, out = tiny_vlm[0], tmp_path / "out"
    convert(src, out, bits=16)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "flashmoe.json").write_text("{")
    (tmp_path / "link").symlink_to(out)
    refused = {notes: "is a file", tmp_path / "mine": "is not one: it holds a.txt", tmp_path / "empty": "empty directory",
               tmp_path / "broken": "its flashmoe.json is not valid", tmp_path / "link": "is a symbolic link"}
    before = files_under(tmp_path)
    for dst, message in refused.items():
        with pytest.raises(ConversionError, match=message):
            convert(src, dst, bits=16, force=True)
    (out / "experts" / "mine.txt").write_text("x")
    with pytest.raises(ConversionError, match=r"did not write \(experts/mine.txt\)"):
        convert(src, out, bits=16, force=True)
    assert files_under(tmp_path) == {**before, "out/experts/mine.txt": b"x"}
    (out / "experts" / "mine.txt").unlink()
    convert(src, out, bits=4, group_size=32, force=True)
    assert Manifest.load(out).layout.bits == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "link", "mine", "notes.txt", "out"]


def test_without_an_atomic_exchange_a_failed_swap_puts_the_old_model_back(tiny_vlm, packed16, tmp_path, monkeypatch):
    out = Path(shutil.copytree(packed16, tmp_path / "out"))
    before = files_under(out)
    monkeypatch.setattr(convert_module, "_rename_exchange", lambda a, b: False)  # as on NFS, or off Linux
    real_rename = os.rename

    def rename_failing_for_the_new_model(a, b):
        if Path(a).name.startswith(".out.partial-"):
            raise OSError(errno.EIO, "the disk went away")
        real_rename(a, b)

    monkeypatch.setattr(convert_module.os, "rename", rename_failing_for_the_new_model)
    with pytest.raises(OSError, match="the disk went away"):
        convert(tiny_vlm[0], out, bits=16, force=True)
    assert files_under(out) == before and list(tmp_path.iterdir()) == [out]
    monkeypatch.setattr(convert_module.os, "rename", real_rename)
    convert(tiny_vlm[0], out, bits=4, group_size=32, force=True)
    assert Manifest.load(out).layout.bits == 4 and list(tmp_path.iterdir()) == [out]


def test_a_model_set_aside_by_a_killed_swap_goes_back_in_place(packed16, tiny_vlm, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    aside = Path(shutil.copytree(packed16, tmp_path / f".out.old-{dead}"))  # killed between the two renames
    before = files_under(aside)
    with pytest.raises(ConversionError, match="already exists"):  # the old model is back: replacing it needs --force
        convert(tiny_vlm[0], tmp_path / "out", bits=16)
    assert files_under(tmp_path / "out") == before and list(tmp_path.iterdir()) == [tmp_path / "out"]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_convert_and_at_load(tiny_vlm, packed16, tmp_path):
    from flashmoe.engine import Engine

    src, model = tmp_path / "hf", Path(shutil.copytree(packed16, tmp_path / "model"))
    src.mkdir()
    shutil.copy(tiny_vlm[0] / "config.json", src)
    shutil.copy(tiny_vlm[0] / "tokenizer.json", src)
    size = write_oversized_tokenizer(src)
    write_oversized_tokenizer(model)
    message = f"has {size} tokens but the model's vocabulary .* has {VOCAB}"
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "out", bits=16)
    with pytest.raises(ValueError, match=message):
        Engine(model)


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
        convert(tiny_vlm[0], tmp_path / "new" / "dirs" / "out", bits=4, group_size=32)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too, and the parents it made
    with pytest.raises(PackedFormatError):
        Manifest.load(tmp_path / "new" / "dirs" / "out")


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
