import json

import pytest
import torch

from flashmoe import quant
from flashmoe.formats.packed import Manifest, PackedFormatError, RecordLayout


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


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(PackedFormatError, match="not a flashmoe model directory"):
        Manifest.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PackedFormatError, match="flashmoe convert"):
        Manifest.load(tmp_path)


def test_wrong_version_and_malformed_manifests(packed16, tmp_path):
    doc = json.loads((packed16 / "flashmoe.json").read_text())
    (tmp_path / "flashmoe.json").write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(PackedFormatError, match="version 99"):
        Manifest.load(tmp_path)
    del doc["experts"]
    (tmp_path / "flashmoe.json").write_text(json.dumps(doc))
    with pytest.raises(PackedFormatError, match="malformed"):
        Manifest.load(tmp_path)
