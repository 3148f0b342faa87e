import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from flashmoe import quant
from flashmoe.formats.packed import (DTYPE_BY_NAME, ExpertFile, Manifest, NgramFile, NgramTableWriter, PackedFormatError,
                                    RecordLayout, check_ngram_bits, default_ngram_bits)

from ..hostile_json import FUZZ, JSON_VALUES, mutated


def test_397b_expert_record_is_the_documented_size():
    layout = RecordLayout.build(4096, 1024, bits=4, group_size=64)
    assert layout.payload_bytes == 7_077_888 and layout.record_size == 7_077_888  # exactly 1728 pages
    assert RecordLayout.build(4096, 1024, 2, 64).payload_bytes == 3 * 4096 * 1024 // 4 + 3 * 4096 * 1024 // 64 * 4


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_pack_and_views_round_trip(bits):
    layout = RecordLayout.build(128, 64, bits, 32)
    assert layout.record_size % 4096 == 0 and all(s.offset % 256 == 0 for s in layout.segments)
    g = torch.Generator().manual_seed(bits)
    tensors = {}
    for proj, shape in {"gate_up_proj": (128, 128), "down_proj": (128, 64)}.items():
        w = torch.randn(shape, generator=g)
        if bits == 16:
            tensors[f"{proj}.weight"] = w.to(torch.bfloat16)
        else:
            q, s, b = quant.quantize(w, bits, 32)
            tensors.update({f"{proj}.weight": q, f"{proj}.scales": s, f"{proj}.biases": b})
    views = layout.views(layout.pack(tensors))
    assert set(views) == set(tensors)
    assert all(torch.equal(views[k], v) for k, v in tensors.items())
    assert RecordLayout.from_json(json.loads(json.dumps(layout.to_json()))) == layout


@pytest.mark.parametrize("bits", [16, 4])
def test_expert_biases_ride_in_the_record_and_old_manifests_read_unchanged(bits):
    plain, biased = RecordLayout.build(128, 64, bits, 32), RecordLayout.build(128, 64, bits, 32, with_bias=True)
    assert "with_bias" not in plain.to_json() and RecordLayout.from_json(plain.to_json()) == plain
    assert RecordLayout.from_json(json.loads(json.dumps(biased.to_json()))) == biased
    g = torch.Generator().manual_seed(3)
    tensors = {s.name: torch.randint(-9, 9, s.shape, generator=g).to(DTYPE_BY_NAME[s.dtype]) for s in biased.segments}
    record = biased.pack(tensors)
    gate_up_bias, down_bias = biased.biases(record, torch.float32)
    assert torch.equal(gate_up_bias, tensors["gate_up_proj.bias"].float()) and down_bias.shape == (128,)
    assert plain.biases(plain.pack({k: v for k, v in tensors.items() if not k.endswith(".bias")}), torch.float32) is None
    with pytest.raises(ValueError, match="with_bias is 'yes', not true or false"):
        RecordLayout.from_json(biased.to_json() | {"with_bias": "yes"})


def test_mxfp4_records_hold_blocks_and_scales_and_name_their_scheme():
    layout = RecordLayout.build(128, 64, 4, 32, with_bias=True, scheme="mxfp4")
    assert [(s.name, s.dtype, s.shape) for s in layout.segments[:2]] == [
        ("gate_up_proj.blocks", "uint8", (128, 64)), ("gate_up_proj.scales", "uint8", (128, 4))]
    assert layout.to_json()["scheme"] == "mxfp4" and RecordLayout.from_json(layout.to_json()) == layout
    assert "scheme" not in RecordLayout.build(128, 64, 4, 32).to_json()
    with pytest.raises(ValueError, match="MXFP4 records hold 4-bit codes in groups of 32, not 4-bit in groups of 64"):
        RecordLayout.from_json(layout.to_json() | {"group_size": 64})
    with pytest.raises(ValueError, match="scheme must be one of affine, mxfp4, not 'nf4'"):
        RecordLayout.from_json(layout.to_json() | {"scheme": "nf4"})


def test_a_layout_is_read_only_as_build_makes_it_and_16_bits_ignore_the_group_size():
    layout = RecordLayout.build(128, 64, 16, 0)  # what convert --bits 16 --group-size 0 stores
    assert RecordLayout.from_json(layout.to_json()) == layout
    shifted = layout.to_json()
    shifted["segments"][1]["offset"] += 256  # an offset that points elsewhere in (or past) the record
    with pytest.raises(ValueError, match="segments or record_size are not what"):
        RecordLayout.from_json(shifted)
    with pytest.raises(ValueError, match="a group holds at least one weight"):
        RecordLayout.from_json(RecordLayout.build(128, 64, 4, 32).to_json() | {"group_size": 0})


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(PackedFormatError, match="not a flashmoe model directory"):
        Manifest.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PackedFormatError, match="flashmoe convert"):
        Manifest.load(tmp_path)
    with pytest.raises(PackedFormatError, match="missing does not exist: it is not a flashmoe model directory"):
        Manifest.load(tmp_path / "missing")
    with pytest.raises(PackedFormatError, match="config.json is a file: it is not a flashmoe model directory"):
        Manifest.load(tmp_path / "config.json")


def test_wrong_version_and_malformed_manifests(packed16, tmp_path):
    doc = json.loads((packed16 / "flashmoe.json").read_text())
    (tmp_path / "flashmoe.json").write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(PackedFormatError, match="version 99"):
        Manifest.load(tmp_path)
    del doc["experts"]
    (tmp_path / "flashmoe.json").write_text(json.dumps(doc))
    with pytest.raises(PackedFormatError, match="experts is not an object"):
        Manifest.load(tmp_path)


def small_manifest() -> dict:
    """A valid manifest document, as Manifest.save writes it: two layers of two 4-bit experts."""
    files = tuple(ExpertFile(layer, f"experts/layer_{layer:03d}.bin", 2, (layer, 2**32 - 1)) for layer in (0, 1))
    with tempfile.TemporaryDirectory() as d:
        Manifest(RecordLayout.build(64, 32, 4, 32), files, "dense.safetensors", "bfloat16", "/src").save(Path(d))
        return json.loads((Path(d) / "flashmoe.json").read_text())


@FUZZ
@given(doc=mutated(small_manifest()) | JSON_VALUES)
def test_a_fuzzed_manifest_loads_consistent_or_is_refused_naming_the_file(tmp_path, doc):
    path = tmp_path / "flashmoe.json"
    path.write_text(json.dumps(doc))
    try:
        manifest = Manifest.load(tmp_path)
    except PackedFormatError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        event("refused")
        return
    event("loaded")
    layout = manifest.layout  # what loads is what the format allows: nothing taken from the file unchecked
    assert layout == RecordLayout.build(layout.hidden_size, layout.intermediate_size, layout.bits, layout.group_size)
    for f in manifest.expert_files:
        assert len(f.crc32) == f.num_experts and not f.file.startswith("/") and ".." not in f.file.split("/")


@FUZZ
@given(data=st.binary(max_size=64))
def test_a_manifest_of_random_bytes_is_refused_naming_the_file(tmp_path, data):
    (tmp_path / "flashmoe.json").write_bytes(data)
    with pytest.raises(PackedFormatError, match=str(tmp_path / "flashmoe.json")):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("width", [8, 160, 3000])  # 256 rows to a block, 12 (and padding), a row over two pages
def test_an_ngram_table_is_the_same_file_however_its_rows_are_streamed(tmp_path, width):
    """The blocks, their padding and the CRC-32s after them (docs/FORMAT.md), from rows written
    whole or in pieces that end mid-block; a table fed more or fewer rows than it has is refused."""
    import io
    import zlib

    table = NgramFile.for_layer(3, 1000, width)
    rows = torch.randint(0, 256, (1000, table.row_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    files = []
    for pieces in ([1000], [1, 254, 300, 445]):
        f = io.BytesIO()
        writer = NgramTableWriter(f, table)
        for piece in rows.split(pieces):
            writer.write(piece)
        writer.close()
        files.append(f.getvalue())
    assert files[0] == files[1] and len(files[0]) == table.file_size and table.file == "ngrams/layer_003.bin"
    data = files[0]
    for r in (0, 999, table.rows_per_block, table.rows_per_block - 1):
        at = r // table.rows_per_block * table.block_bytes + r % table.rows_per_block * table.row_bytes
        assert data[at : at + table.row_bytes] == rows[r].numpy().tobytes()
    crcs = torch.frombuffer(bytearray(data[table.crc_offset :]), dtype=torch.int32).view(torch.uint32)
    blocks = [data[b * table.block_bytes : (b + 1) * table.block_bytes] for b in range(table.blocks)]
    assert [int(c) for c in crcs] == [zlib.crc32(b) for b in blocks]
    assert not any(blocks[0][table.rows_per_block * table.row_bytes :]) and not any(data[table.crc_offset - 1 : table.crc_offset])
    writer = NgramTableWriter(io.BytesIO(), table)
    writer.write(rows[:999])
    with pytest.raises(ValueError, match="layer 3's n-gram table has 1000 rows; 999 were written"):
        writer.close()
    with pytest.raises(ValueError, match="1000 rows; 1001 were written"):
        writer.write(rows[:2])


@pytest.mark.parametrize("bits,scheme,bias", [(2, "affine", False), (4, "affine", True), (8, "affine", False),
                                              (16, "affine", True), (4, "mxfp4", True)])
def test_a_batch_of_records_gives_each_record_s_weights(bits, scheme, bias):
    """layout.weights / biases of records [n, record_size] (the CPU prefill's one pass per batch)
    equal each record's own, exactly."""
    from flashmoe.bench.synthesis import random_records

    layout = RecordLayout.build(128, 64, bits, 32, with_bias=bias, scheme=scheme)
    records = random_records(layout, 3, torch.Generator().manual_seed(bits))
    gate_ups, downs = layout.weights(records, torch.float32)
    assert gate_ups.shape == (3, 128, 128) and downs.shape == (3, 128, 64)
    for j in range(3):
        gate_up, down = layout.weights(records[j], torch.float32)
        assert torch.equal(gate_ups[j], gate_up) and torch.equal(downs[j], down)
        if bias:
            assert all(torch.equal(b[j], one) for b, one in zip(layout.biases(records, torch.float32), layout.biases(records[j], torch.float32)))


def test_8bit_ngram_rows_are_codes_and_a_scale_within_half_a_step():
    """Rows of the release's width (160): int8 codes, then the row's float32 scale (164 bytes, 24
    to a block: half the 16-bit table's blocks); each value within half a step (max |v| / 254) of
    its own; a zero row stays zero. Gaussian rows' relative error: measured 0.66% (mean over rows),
    1.02% (worst of 4096)."""
    table = NgramFile.for_layer(1, 4096, 160, "int8")
    assert (table.scale_dtype, table.row_bytes, table.rows_per_block) == ("float32", 164, 24)
    assert NgramFile.for_layer(1, 4096, 160).rows_per_block == 12
    values = torch.randn(4096, 160, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    values[1] = 0
    values[2, 7] = 1000  # an outlier: the row's other values round to zero
    stored = table.encode(values)
    assert stored.shape == (4096, 164) and stored.dtype == torch.uint8
    absmax = values.float().abs().amax(1)
    assert torch.equal(stored[:, 160:].contiguous().view(torch.float32)[:, 0], absmax / 127)
    decoded = table.decode(stored)
    assert decoded.dtype == torch.float32 and not decoded[1].any() and decoded[2, 7] == 1000
    assert ((decoded - values.float()).abs().amax(1) <= absmax / 254 * (1 + 1e-4)).all()  # ties, up to fp32 rounding
    per_row = (decoded - values.float()).norm(dim=1) / values.float().norm(dim=1).clamp_min(1e-30)
    gaussian = torch.cat([per_row[:1], per_row[3:]])
    assert gaussian.mean() <= 0.0070 and gaussian.max() <= 0.012
    sixteen = NgramFile.for_layer(1, 4096, 160)
    assert torch.equal(sixteen.decode(sixteen.encode(values)), values)  # 16-bit rows keep their values


def test_ngram_bits_are_16_or_8_and_default_to_8_beside_quantized_experts():
    assert [default_ngram_bits(bits) for bits in (16, 8, 4, 2, None)] == [16, 8, 8, 8, 8]
    check_ngram_bits(8)
    with pytest.raises(ValueError, match=r"--ngram-bits must be 16 \(the checkpoint's values\) or 8 \(int8 codes and a "
                                         r"float32 scale per row\), not 4"):
        check_ngram_bits(4)


def test_a_manifests_8bit_ngram_table_needs_its_scale(tmp_path):
    """An int8 table is stored with scale_dtype, and read back; one without it (or a 16-bit table
    with one) is refused, naming the entry."""
    tables = (NgramFile.for_layer(0, 100, 160, "int8"), NgramFile.for_layer(2, 100, 160, "float16"))
    Manifest(RecordLayout.build(64, 32, 4, 32), (), "dense.safetensors", "bfloat16", "/src", tables).save(tmp_path)
    doc = json.loads((tmp_path / "flashmoe.json").read_text())
    assert [f.get("scale_dtype") for f in doc["ngrams"]["files"]] == ["float32", None]
    assert "scale_dtype" not in doc["ngrams"]["files"][1]  # 16-bit tables' entries are as before
    assert Manifest.load(tmp_path).ngram_files == tables
    for i, scale in ((0, None), (0, "float16"), (1, "float32")):
        entry = {k: v for k, v in doc["ngrams"]["files"][i].items() if k != "scale_dtype"}
        files = [entry if j == i else f for j, f in enumerate(doc["ngrams"]["files"])]
        if scale:
            entry["scale_dtype"] = scale
        (tmp_path / "flashmoe.json").write_text(json.dumps({**doc, "ngrams": {**doc["ngrams"], "files": files}}))
        with pytest.raises(PackedFormatError, match=rf"ngrams.files\[{i}\] has dtype .* and scale_dtype .*: int8 rows need "
                                                    "scale_dtype 'float32' \\(each row ends with its scale\\), 16-bit rows none"):
            Manifest.load(tmp_path)
