"""Affine group quantization with MLX semantics: w ~ q * scale + bias, one 16-bit (scale, bias)
per group of `group_size` consecutive input weights, q unsigned in [0, 2^bits - 1] (the experts);
and symmetric int8 with one fp32 scale per output channel (the resident dense weights with
`--dense-bits 8`, quantized at load time; docs/EXPERIMENTS.md says why this scheme).

Codes are packed along the input dimension into little-endian uint32 words: element j of a row
sits in word j // (32 / bits) at bit offset bits * (j % (32 / bits)). This is the plain PyTorch
reference; the GPU kernels read the same layout.
"""

from __future__ import annotations

import torch

QUANT_BITS = (8, 4, 2)
SCALE_DTYPE = torch.bfloat16


def check_shape(in_features: int, bits: int, group_size: int) -> None:
    if in_features % group_size:
        raise ValueError(
            f"input dimension {in_features} is not a multiple of --group-size {group_size}; pick a group size that divides it"
        )
    if (in_features * bits) % 32:
        raise ValueError(f"input dimension {in_features} at {bits} bits does not fill whole 32-bit words")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes -> [N, K * bits / 32] int32 words (the bit pattern of uint32)."""
    per_word = 32 // bits
    n, k = codes.shape
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (codes.to(torch.int64).view(n, k // per_word, per_word) << shifts).sum(-1)
    return words.to(torch.uint32).view(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., N, W] packed words -> [..., N, W * 32 / bits] codes (int32, or uint8 for 8-bit)."""
    if bits == 8:  # in a little-endian word each byte is one code, in order
        return words.contiguous().view(torch.uint8)
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    codes = (words.view(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1)


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] weights -> (packed codes [N, K*bits/32] int32, scales [N, K/g], biases [N, K/g] in SCALE_DTYPE)."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    n, k = w.shape
    check_shape(k, bits, group_size)
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    levels = (1 << bits) - 1
    # Round scale and bias to their stored precision first, so the codes are chosen against the
    # values the kernels will actually use.
    scales = ((hi - lo) / levels).clamp_min(1e-12).to(SCALE_DTYPE)
    biases = lo.to(SCALE_DTYPE)
    codes = ((groups - biases.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).round().clamp_(0, levels)
    return pack(codes.view(n, k).to(torch.int32), bits), scales, biases


def dequantize(
    words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of `quantize`: [N, K] weights in `dtype` (or [..., N, K]: a batch of tensors at once)."""
    codes = unpack(words, bits)
    *lead, n, k = codes.shape
    groups = codes.view(*lead, n, k // group_size, group_size).to(torch.float32)
    w = torch.addcmul(biases.float().unsqueeze(-1), groups, scales.float().unsqueeze(-1))
    return w.view(*lead, n, k).to(dtype)


def quantize_int8_rows(w: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weights -> (codes int8 [N, K] in [-127, 127], scales fp32 [N]), w ~ codes * scales[:, None].
    Works `chunk` rows at a time on w's device, so the fp32 temporaries of a 248k-row lm_head stay small."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], chunk):
        # In float64, where every operation here is correctly rounded on any device: in fp32 the
        # CPU's division by 127 and the GPU's could differ by an ulp, and so a code that rounds at a
        # tie (the H100 quantized 2 of a tiny model's o_proj codes apart from the CPU: logits 1.7e-4).
        rows = w[start : start + chunk].double()
        s = rows.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # an all-zero row gets codes 0
        scales[start : start + chunk] = s
        codes[start : start + chunk] = (rows / s.float().double()[:, None]).round_().clamp_(-127, 127)
    return codes, scales


def dequantize_int8_rows(codes: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of `quantize_int8_rows`: [N, K] weights in `dtype`."""
    return (codes.float() * scales[:, None]).to(dtype)


# MXFP4 (OCP Microscaling, as gpt-oss releases its experts): 32 consecutive input weights share
# one E8M0 scale byte s (2^(s - 127); 255 is NaN); each weight is an FP4 E2M1 code, two per byte,
# the even element in the low nibble. Rows are [N, K / 2] bytes and [N, K / 32] scales.
MXFP4_GROUP = 32
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_NAN = 255


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[..., N, K / 2] uint8 codes and [..., N, K / 32] uint8 scales -> [..., N, K] weights in `dtype`
    (exact in fp32)."""
    lead = blocks.shape[:-1]
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).view(*lead, -1, MXFP4_GROUP).long()
    w = torch.ldexp(lut[codes], scales.to(torch.int32).unsqueeze(-1) - 127)
    return w.view(*lead, -1).to(dtype)


def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """||w - approx|| / ||w||: the figure the converter reports per tensor kind."""
    w = w.float()
    return float((w - approx.float()).norm() / w.norm().clamp_min(1e-30))
