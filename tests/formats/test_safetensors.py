import pytest
import torch

from flashmoe.formats.safetensors import Checkpoint, CheckpointError, SafetensorsFile, save_file


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randint(-5, 5, (7,), generator=g, dtype=torch.int32),
        "c": torch.randn(4, 2, 3, generator=g),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
    }


def test_round_trip_and_reference_library_agree(tmp_path):
    from safetensors.torch import load_file

    tensors = sample()
    save_file(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    ref = load_file(tmp_path / "x.safetensors")  # the reference library reads what we write
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.read(name), t) and torch.equal(ref[name], t)
        assert torch.equal(f.read_row("c", 2), tensors["c"][2])


def test_reads_files_written_by_the_reference_library(tmp_path):
    from safetensors.torch import save_file as ref_save

    tensors = sample()
    ref_save(tensors, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt:
        assert sorted(ckpt.names()) == sorted(tensors)
        assert torch.equal(ckpt.read("a"), tensors["a"])


def test_truncated_file_is_reported(tmp_path):
    save_file(sample(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path)


def test_garbage_header_is_reported(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="JSON"):
        Checkpoint(tmp_path)


def test_pickles_are_never_loaded(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are never loaded"):
        Checkpoint(tmp_path)
