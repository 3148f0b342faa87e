import pytest
import torch

from flashmoe import quant

# ||w - dequant(quant(w))|| / ||w|| for Gaussian weights, groups of 64 (measured: 0.0054, 0.090, 0.45)
ERROR_BOUNDS = {8: 0.008, 4: 0.11, 2: 0.5}


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_is_bounded(bits):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(bits))
    codes, scales, biases = quant.quantize(w, bits, 64)
    assert codes.shape == (256, 512 * bits // 32) and codes.dtype == torch.int32
    assert scales.shape == biases.shape == (256, 8) and scales.dtype == torch.bfloat16
    err = quant.relative_error(w, quant.dequantize(codes, scales, biases, bits, 64))
    assert 0 < err < ERROR_BOUNDS[bits]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_identity(bits):
    codes = torch.randint(0, 1 << bits, (16, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(quant.unpack(quant.pack(codes, bits), bits), codes)


def test_packing_order_is_little_endian_within_words():
    codes = torch.arange(8, dtype=torch.int32).view(1, 8)  # 4-bit codes 0..7 -> one word 0x76543210
    assert quant.pack(codes, 4).item() == 0x76543210


def test_representable_weights_survive_exactly():
    levels = torch.arange(16, dtype=torch.float32).repeat(4, 4) * 0.5 - 1.0  # a grid 4-bit affine codes hit exactly
    codes, scales, biases = quant.quantize(levels, 4, 64)
    assert torch.equal(quant.dequantize(codes, scales, biases, 4, 64), levels)


def test_constant_groups_do_not_divide_by_zero():
    w = torch.full((2, 64), 3.0)
    out = quant.dequantize(*quant.quantize(w, 4, 64), 4, 64)
    assert torch.allclose(out, w)


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="group-size"):
        quant.quantize(torch.randn(4, 96), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(4, 64), 3, 64)


def test_int8_rows_error_is_bounded_and_scales_fill_the_range():
    w = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    codes, scales = quant.quantize_int8_rows(w, chunk=100)  # chunks that do not divide the rows
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (256,)
    assert int(codes.abs().amax(1).min()) == 127  # each row's largest weight maps to +-127
    err = quant.relative_error(w, quant.dequantize_int8_rows(codes, scales))
    assert 0 < err < 0.011  # measured 0.0087 (Gaussian rows of 4096; scripts/dense8_scheme.py)


def test_int8_rows_keep_representable_weights_and_zero_rows_exactly():
    w = torch.tensor([[-127.0, 0.0, 3.0, 127.0], [0.0, 0.0, 0.0, 0.0]]) * 0.5
    codes, scales = quant.quantize_int8_rows(w)
    assert torch.equal(quant.dequantize_int8_rows(codes, scales), w)


def test_int8_rows_are_the_correctly_rounded_codes_of_their_fp32_scales():
    """The codes any device must produce: scale = fp32(max|w| / 127) rounded once, code = the
    nearest integer to w / scale, exactly (float64 arithmetic, correctly rounded everywhere). fp32
    arithmetic let the CPU and the H100 disagree on 2 codes of a tiny model (EXPERIMENTS entry 89)."""
    w = (torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    w[3, :2] = torch.tensor([0.5, -63.5 / 127 * 0.5])  # a row whose second value lies on a tie of its scale
    codes, scales = quant.quantize_int8_rows(w)
    w64 = w.double()
    want_scales = (w64.abs().amax(1) / 127).float()
    assert torch.equal(scales, want_scales)
    assert torch.equal(codes, (w64 / want_scales.double()[:, None]).round().to(torch.int8))


def test_mxfp4_dequantization_is_transformers_on_random_bytes():
    """Every code and a wide range of scale bytes (not 255, E8M0's NaN), against transformers' own
    dequantization of released gpt-oss blocks ([E, N, K/32, 16] -> [E, K, N])."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(90, 160, (3, 8, 4), dtype=torch.uint8, generator=g)
    scales[0, 0, 0], scales[0, 0, 1] = 0, 254  # the smallest and largest finite scales
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    got = torch.stack([quant.dequantize_mxfp4(b.reshape(8, -1), s) for b, s in zip(blocks, scales)])
    assert torch.equal(got, reference)
