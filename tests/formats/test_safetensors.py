import json
import math
import struct

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from flashmoe.formats.safetensors import DTYPES, Checkpoint, CheckpointError, SafetensorsFile, save_file

from ..hostile_json import FUZZ, JSON_VALUES


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


def test_malformed_header_entries_are_reported_naming_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases = {
        "not an object of tensors": [good],
        "tensor 'a' has data_offsets None": {"a": {"dtype": "F32", "shape": [2]}},
        "tensor 'a' has shape [-1]": {"a": {**good, "shape": [-1]}},
        "tensor 'a' has shape [True, 2]": {"a": {**good, "shape": [True, 2]}},
        "tensor 'a' has shape [0, 2, 4611686018427387904], more elements": {  # empty, yet its strides overflow
            "a": {**good, "shape": [0, 2, 2**62], "data_offsets": [0, 0]}},
        "tensor 'a' has unsupported dtype 5": {"a": {**good, "dtype": 5}},
        "tensor 'a' has data_offsets [8, 0]": {"a": {**good, "data_offsets": [8, 0]}},
        "tensors 'a' and 'b' overlap": {"a": good, "b": {**good, "data_offsets": [4, 12]}},
        "tensor 'a' ends at byte": {"a": {**good, "shape": [2**40], "data_offsets": [0, 2**42]}},
        "__metadata__ is 7": {"__metadata__": 7},
    }
    for message, header in cases.items():
        write_safetensors(path, header, data_bytes=16)
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
            SafetensorsFile(path)


def test_a_broken_index_is_reported_naming_the_file_and_the_position(tmp_path):
    save_file(sample(), tmp_path / "a.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    cases = {
        '{"weight_map": ': "is not valid JSON: Expecting value at line 1 column 16",
        '{"metadata": {}}': "has no weight_map",
        '{"weight_map": {"a": "../a.safetensors"}}': "names the shard '../a.safetensors', not a file name beside it",
        '{"weight_map": {"a": "b.safetensors"}}': "b.safetensors is listed in model.safetensors.index.json but missing",
    }
    for text, message in cases.items():
        index.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            Checkpoint(tmp_path)


def write_safetensors(path, header, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))


def expect_parsed_or_refused(path, parse):
    """`parse()` either succeeds or raises CheckpointError naming `path` on one line; nothing else."""
    try:
        result = parse()
    except CheckpointError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        event("refused")
        return None
    event("parsed")
    return result


SIZES = st.integers(-2, 6) | st.integers(min_value=2**62, max_value=2**64)


@st.composite
def headers(draw):
    """A header of plausible entries laid end to end, with offsets nudged (overlaps, gaps, negatives) and
    now and then one field of an entry replaced by any JSON value."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text(max_size=6), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(SIZES, max_size=3))
        begin = offset + draw(st.sampled_from([0] * 8 + [-4, 4]))
        end = begin + math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        field = draw(st.sampled_from([None] * 8 + ["dtype", "shape", "data_offsets"]))
        if field:
            header[name][field] = draw(JSON_VALUES | st.lists(SIZES, max_size=3))
        offset = max(offset, end)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | JSON_VALUES)
    return header


@FUZZ
@given(header=headers() | JSON_VALUES, data_bytes=st.integers(0, 96))
def test_a_fuzzed_header_parses_to_readable_tensors_or_is_refused_naming_the_file(tmp_path, header, data_bytes):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, header, data_bytes)
    f = expect_parsed_or_refused(path, lambda: SafetensorsFile(path))
    if f is not None:
        with f:  # every tensor the parser accepts can be read: its bytes lie inside the file
            assert all(f.read(name).shape == info.shape for name, info in f.tensors.items())


@FUZZ
@given(data=st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b))
def test_a_file_of_random_bytes_is_refused_naming_the_file(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    expect_parsed_or_refused(path, lambda: SafetensorsFile(path).close())


SHARDS = st.sampled_from(
    ["a.safetensors", "b.safetensors", "missing.safetensors", "../a.safetensors", "/etc/passwd", "", ".", "sub/a"]
)
WEIGHT_MAPS = st.dictionaries(st.text(max_size=4), st.just("a.safetensors") | SHARDS | JSON_VALUES, max_size=3)


@FUZZ
@given(index=st.fixed_dictionaries({"weight_map": WEIGHT_MAPS}) | JSON_VALUES | st.binary(max_size=32))
def test_a_fuzzed_index_opens_its_shards_or_is_refused_naming_the_file(tmp_path, index):
    save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"x": torch.ones(2)}, tmp_path / "b.safetensors")  # both: the same tensor twice
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    ckpt = expect_parsed_or_refused(tmp_path, lambda: Checkpoint(tmp_path))
    if ckpt is not None:
        with ckpt:
            assert ckpt.read("x").shape == (2,)
